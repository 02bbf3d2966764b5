package xenstored

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"xenblkd/internal/xenstore"
)

// TestDaemon starts each kind, talks to it with the real xenstore-* tools
// (an independent client), restarts it and checks it is killed by pid.
func TestDaemon(t *testing.T) {
	for _, kind := range []Kind{C, OCaml} {
		t.Run(string(kind), func(t *testing.T) {
			d := Start(t, kind)
			run := func(args ...string) string {
				t.Helper()
				cmd := exec.Command(args[0], args[1:]...)
				cmd.Env = append(os.Environ(), d.Env()...)
				out, err := cmd.CombinedOutput()
				if err != nil {
					t.Fatalf("%v: %v\n%s", args, err, out)
				}
				return strings.TrimSpace(string(out))
			}
			run("xenstore-write", "xbtest/a", "1")
			if got := run("xenstore-read", "/local/domain/0/xbtest/a"); got != "1" {
				t.Errorf("read back: got %q, want %q", got, "1")
			}
			if got, want := run("xenstore-read", "/tool/xenstored"), ""; kind == OCaml && got == want {
				t.Errorf("/tool/xenstored is empty on oxenstored")
			}

			old := d.Pid
			if err := d.Restart(); err != nil {
				t.Fatal(err)
			}
			if d.Pid == old {
				t.Errorf("Restart kept pid %d", old)
			}
			if err := syscall.Kill(old, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("old daemon pid %d still exists after Restart: %v", old, err)
			}
			c, err := xenstore.DialUnix(context.Background(), d.Socket)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			if _, err := c.Read(context.Background(), "xbtest/a"); !errors.Is(err, syscall.ENOENT) {
				t.Errorf("read after restart: got %v, want ENOENT (fresh store)", err)
			}
			if got, err := c.Read(context.Background(), "name"); err != nil || got != "Domain-0" {
				t.Errorf("read name: got %q, %v; want Domain-0", got, err)
			}
			if err := d.Kill(); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat("/proc/" + strconv.Itoa(d.Pid)); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("daemon pid %d survives Kill", d.Pid)
			}
		})
	}
}
