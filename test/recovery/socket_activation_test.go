package recovery_test

import (
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestRestartDuringAdds: with socket activation (dist/xenblkd.socket),
// `systemctl restart xenblkd` while adds are exec'd in a loop fails none of
// them: systemd keeps the API socket listening, so a hotplug call made while
// no daemon runs waits in its backlog for the next one.
func TestRestartDuringAdds(t *testing.T) {
	dir := privateDir(t, "xb-rec-sock-")
	os.Chmod(dir, 0o755)
	img := makeImage(t, dir, "shared.img")
	u := startUnit(t, dir)
	if fi, err := os.Stat(u.Socket()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket %s: %v, mode %v; want 0600 (SocketMode=)", u.Socket(), err, fi.Mode())
	}

	var adds, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				k := key{domid: 900 + w, devid: 51712 + i}
				setupBackend(t, k, img, "r", "/etc/xen/scripts/xenblkd")
				adds.Add(1)
				// No retry by the entry: only the socket may bridge the restart.
				if out, code := hotplug(t, u, "add", k, "XENBLKD_CONNECT_TIMEOUT=0s"); code != 0 {
					failed.Add(1)
					t.Errorf("add %s during restarts: exit %d: %s", k.be(), code, strings.TrimSpace(out))
				}
				removeUntilDone(t, u, k)
				rmBackend(k)
			}
		})
	}
	const restarts = 3
	for range restarts {
		time.Sleep(300 * time.Millisecond)
		u.systemctl(t, "restart", unitName)
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("%d adds across %d restarts, %d failed", adds.Load(), restarts, failed.Load())
	if n := strings.Count(u.Log(), "socket_activated=true"); n < restarts+1 {
		t.Errorf("%d daemon starts on systemd's socket in the log, want %d", n, restarts+1)
	}
}
