package main_test

// Cluster mode with the real sanlock daemon: two simulated hosts on this
// machine, each a sanlock daemon (test/sanlockd: its own run directory, host
// id 1 or 2, watchdog off) and a xenblkd daemon with its own private C
// xenstored, sharing one lockspace file and one "LUN": a loop device the test
// binds to an image under the shared directory, given to guests as
// phy:/dev/loopN on both hosts (a loop device stands for its file, so its
// identity is the image's path under the share). The lockspace's io_timeout
// is 1 s, so joining takes ~2 s and a dead host's leases expire after
// 8*1+60 s.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/loop"
	"xenblkd/internal/sanlock"
	"xenblkd/internal/xenstore"
	"xenblkd/test/build"
	"xenblkd/test/libxl"
	"xenblkd/test/sanlockd"
	"xenblkd/test/xenstored"
)

// host is one simulated Xen host in cluster mode.
type host struct {
	name string
	id   int
	xsd  *xenstored.Daemon
	xs   *xenstore.Client
	san  *sanlockd.Daemon
	d    *daemon
	args []string // the xenblkd daemon's cluster flags
	// metrics is the daemon's --metrics-listen socket.
	metrics string
}

// cluster is two hosts sharing a lockspace and a directory of images.
type cluster struct {
	a, b  *host
	share string // the shared directory (--cluster-shares)
}

// newCluster starts the two hosts; extra flags go to both xenblkd daemons.
func newCluster(t *testing.T, extra ...string) *cluster {
	t.Helper()
	dir := t.TempDir()
	c := &cluster{share: filepath.Join(dir, "pool")}
	leases := filepath.Join(dir, "leases")
	for _, d := range []string{c.share, leases} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	var ls sanlock.Lockspace
	for i, name := range []string{"hostA", "hostB"} {
		h := &host{name: name, id: i + 1, xsd: xenstored.Start(t, xenstored.C), san: sanlockd.Start(t)}
		var err error
		h.xs, err = xenstore.DialUnix(context.Background(), h.xsd.Socket)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { h.xs.Close() })
		if i == 0 {
			ls = sanlockd.NewLockspace(t, h.san, leases, "xbe2e", 1)
		}
		mdir, err := os.MkdirTemp("", "xbm-") // short: a socket path
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(mdir) })
		h.metrics = filepath.Join(mdir, "metrics.sock")
		h.args = []string{"--presetup=false", "--metrics-listen", "unix:" + h.metrics,
			"--cluster-lockspace", "xbe2e:" + ls.Disk.Path, "--cluster-host-id", fmt.Sprint(h.id),
			"--cluster-shares", c.share + "=pool", "--cluster-host-name", name,
			"--sanlock-dir", h.san.Dir, "--cluster-handover", "5s"}
		h.args = append(h.args, extra...)
		if i == 0 {
			c.a = h
		} else {
			c.b = h
		}
	}
	// Join concurrently: each takes 2*io_timeout.
	done := make(chan *daemon, 1)
	go func() { done <- c.b.startUnchecked(t) }()
	c.a.start(t)
	c.b.d = <-done
	if c.b.d == nil {
		t.Fatal("host B's daemon did not start")
	}
	return c
}

func (h *host) start(t *testing.T) {
	t.Helper()
	h.d = startDaemon(t, h.xsd.Socket, h.args...)
}

// startUnchecked is start for another goroutine: startDaemon's t.Fatal must
// not run there, so a failure shows as nil (and the daemon's log in cleanup).
func (h *host) startUnchecked(t *testing.T) (d *daemon) {
	defer func() {
		if recover() != nil {
			d = nil
		}
	}()
	return startDaemon(t, h.xsd.Socket, h.args...)
}

// lun binds a loop device to a new image under the share: a shared disk
// both hosts see under the same name.
func (c *cluster) lun(t *testing.T, name string) string {
	t.Helper()
	img := filepath.Join(c.share, name)
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	return losetup(t, img)
}

// disk writes a disk's nodes as libxl does, for a domain of VM vm.
func (h *host) disk(t *testing.T, domid int, params, mode, vm string) libxl.Disk {
	t.Helper()
	ctx := context.Background()
	d := libxl.Disk{Domid: domid, Devid: 51712, Params: params, Mode: mode, Script: "/etc/xen/scripts/xenblkd", VM: vm}
	if err := libxl.Write(ctx, h.xs, d); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.removeNodes(d) })
	if err := h.xs.Write(ctx, d.BackendAbs()+"/state", "2"); err != nil {
		t.Fatal(err)
	}
	return d
}

func (h *host) removeNodes(d libxl.Disk) {
	ctx := context.Background()
	libxl.Remove(ctx, h.xs, d)
	h.xs.Rm(ctx, fmt.Sprintf("/local/domain/%d", d.Domid))
}

// add runs the hotplug add and returns its stderr and exit code.
func (h *host) add(t *testing.T, d libxl.Disk) (string, int, time.Duration) {
	t.Helper()
	start := time.Now()
	stderr, code := hotplug(t, h.d, "add", d.Backend())
	return stderr, code, time.Since(start)
}

func (h *host) mustAdd(t *testing.T, d libxl.Disk) time.Duration {
	t.Helper()
	stderr, code, took := h.add(t, d)
	if code != 0 {
		t.Fatalf("%s: add %s: exit %d: %s", h.name, d.Backend(), code, stderr)
	}
	return took
}

// refused checks that the add fails naming want, in stderr and in
// hotplug-error, and leaves no physical-device.
func (h *host) refused(t *testing.T, d libxl.Disk, want ...string) {
	t.Helper()
	stderr, code, _ := h.add(t, d)
	herr, _ := h.xs.Read(context.Background(), d.BackendAbs()+"/hotplug-error")
	for _, w := range want {
		if code == 0 || !strings.Contains(stderr, w) || !strings.Contains(herr, w) {
			t.Fatalf("%s: add %s: exit %d, stderr %q, hotplug-error %q; want a refusal containing %q", h.name, d.Backend(), code, stderr, herr, w)
		}
	}
	if _, err := h.xs.Read(context.Background(), d.BackendAbs()+"/physical-device"); err == nil {
		t.Fatalf("%s: physical-device written for a refused add", h.name)
	}
	t.Logf("%s refused: %s", h.name, strings.TrimSpace(stderr))
}

// remove runs the hotplug remove and then removes the nodes, as libxl does
// when a guest goes.
func (h *host) remove(t *testing.T, d libxl.Disk) {
	t.Helper()
	mustHotplug(t, h.d, "remove", d.Backend())
	h.removeNodes(d)
}

// leases asks the daemon's status for its leases.
func (h *host) leases(t *testing.T) []api.Lease {
	t.Helper()
	out, err := exec.Command(binary, "status", "--json", "--socket", h.d.socket).Output()
	if err != nil {
		t.Fatalf("%s: status: %v", h.name, err)
	}
	var resp api.Response
	if err := json.Unmarshal(out, &resp); err != nil {
		t.Fatalf("%s: status --json: %v: %s", h.name, err, out)
	}
	return resp.Leases
}

func (h *host) leaseModes(t *testing.T) string {
	var modes []string
	for _, l := range h.leases(t) {
		modes = append(modes, l.Mode)
	}
	return strings.Join(modes, ",")
}

// metric returns the value of one series (its exposition line without the
// value, e.g. `xenblkd_leases{mode="exclusive"}`) from the daemon's metrics.
func (h *host) metric(t *testing.T, series string) string {
	t.Helper()
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", h.metrics)
	}}}
	resp, err := c.Get("http://xenblkd/metrics")
	if err != nil {
		t.Fatalf("%s: metrics: %v", h.name, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			return v
		}
	}
	t.Fatalf("%s: metrics lack %s", h.name, series)
	return ""
}

// waitFor polls cond every 20 ms until it holds or the bound passes.
func waitFor(t *testing.T, bound time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > bound {
			t.Fatalf("%s: not within %v", what, bound)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

func TestClusterTwoHosts(t *testing.T) {
	c := newCluster(t)
	lun := c.lun(t, "disk1.img")

	// rw on A, then rw on B for another VM: refused, naming A and its VM.
	a1 := c.a.disk(t, 1, lun, "w", "/vm/aaaa")
	took := c.a.mustAdd(t, a1)
	t.Logf("CASE rw add on A with its lease: %v", took)
	if got := c.a.leaseModes(t); got != "exclusive" {
		t.Fatalf("A's leases: %q, want exclusive", got)
	}
	b2 := c.b.disk(t, 2, lun, "w", "/vm/bbbb")
	c.b.refused(t, b2, "hostA", "/vm/aaaa", "read-write")
	// ro on B is refused too: A writes it.
	c.b.removeNodes(b2)
	b2 = c.b.disk(t, 2, lun, "r", "/vm/bbbb")
	c.b.refused(t, b2, "hostA")
	c.b.removeNodes(b2)
	if got := c.b.leaseModes(t); got != "" {
		t.Fatalf("B's leases after its refused adds: %q, want none", got)
	}

	// rw on B once A's guest has gone.
	start := time.Now()
	c.a.remove(t, a1)
	b2 = c.b.disk(t, 2, lun, "w", "/vm/bbbb")
	c.b.mustAdd(t, b2)
	t.Logf("CASE rw on B after A's guest removed: A's remove + B's add %v", time.Since(start))
	c.b.remove(t, b2)
	if got := c.b.leaseModes(t); got != "" {
		t.Fatalf("B's leases after its last remove: %q, want none", got)
	}

	// ro on both hosts: shared leases.
	a3 := c.a.disk(t, 3, lun, "r", "/vm/aaaa")
	b4 := c.b.disk(t, 4, lun, "r", "/vm/bbbb")
	c.a.mustAdd(t, a3)
	c.b.mustAdd(t, b4)
	if ga, gb := c.a.leaseModes(t), c.b.leaseModes(t); ga != "shared" || gb != "shared" {
		t.Fatalf("leases: A %q, B %q; want shared on both", ga, gb)
	}
	// rw on A (once A's reader went) while B reads: refused.
	c.a.remove(t, a3)
	a5 := c.a.disk(t, 5, lun, "w", "/vm/cccc")
	c.a.refused(t, a5, "hostB", "read-only")
	c.b.remove(t, b4)

	// A local disk (not under the share) holds no lease.
	img, _ := image(t, "local.img")
	a6 := c.a.disk(t, 6, losetup(t, img), "w", "/vm/aaaa")
	c.a.mustAdd(t, a6)
	if got := c.a.leaseModes(t); got != "" {
		t.Fatalf("A's leases with only a local disk: %q, want none", got)
	}
	c.a.remove(t, a6)
}

// TestClusterDaemonKilled: a crash of xenblkd keeps its leases (sanlock
// keeps them as orphans) and the restarted daemon re-adopts them.
func TestClusterDaemonKilled(t *testing.T) {
	c := newCluster(t)
	lun := c.lun(t, "disk2.img")
	a1 := c.a.disk(t, 1, lun, "w", "/vm/aaaa")
	c.a.mustAdd(t, a1)
	c.a.d.kill(t)
	b2 := c.b.disk(t, 2, lun, "w", "/vm/bbbb")
	c.b.refused(t, b2, "hostA", "/vm/aaaa")
	c.b.removeNodes(b2)

	c.a.start(t) // recovery restores domain 1's attachment and adopts its lease
	if got := c.a.leaseModes(t); got != "exclusive" {
		t.Fatalf("A's leases after restart: %q, want exclusive (re-adopted)", got)
	}
	if log := logText(c.a.d); strings.Contains(log, "level=ERROR") {
		t.Fatalf("A's recovery logged an error:\n%s", log)
	}
	b2 = c.b.disk(t, 2, lun, "w", "/vm/bbbb")
	c.b.refused(t, b2, "hostA", "/vm/aaaa")
	c.b.removeNodes(b2)
	c.a.remove(t, a1)
	b2 = c.b.disk(t, 2, lun, "w", "/vm/bbbb")
	c.b.mustAdd(t, b2)
	c.b.remove(t, b2)
}

// migrating attaches a new LUN read-write to VM /vm/mmmm's domain 1 on A,
// then to its domain 7 on B, as a live migration's destination does while
// the source still runs: B's lease is pending.
func (c *cluster) migrating(t *testing.T, image string) (lun string, a1, b7 libxl.Disk) {
	t.Helper()
	lun = c.lun(t, image)
	a1 = c.a.disk(t, 1, lun, "w", "/vm/mmmm")
	c.a.mustAdd(t, a1)
	b7 = c.b.disk(t, 7, lun, "w", "/vm/mmmm")
	c.b.mustAdd(t, b7)
	if got := c.b.leaseModes(t); got != "pending" {
		t.Fatalf("B's lease during the migration: %q, want pending", got)
	}
	return lun, a1, b7
}

// TestClusterMigration: the same VM attaches on the destination while the
// source holds the lease; the lease passes when the source lets go; then
// another VM on the source is refused.
func TestClusterMigration(t *testing.T) {
	c := newCluster(t)
	lun, a1, b7 := c.migrating(t, "disk3.img")
	start := time.Now()
	c.a.remove(t, a1) // the source domain goes once the guest runs on B
	handover := waitFor(t, 10*time.Second, "hand-over to B", func() bool { return c.b.leaseModes(t) == "exclusive" })
	t.Logf("CASE migration hand-over: source remove + hand-over %v (after the remove returned: %v)", time.Since(start), handover)
	a2 := c.a.disk(t, 2, lun, "w", "/vm/oooo")
	c.a.refused(t, a2, "hostB", "/vm/mmmm")
	c.a.removeNodes(a2)
	for _, m := range []struct {
		h            *host
		series, want string
	}{
		{c.b, `xenblkd_leases{mode="exclusive"}`, "1"},
		{c.b, `xenblkd_leases{mode="pending"}`, "0"},
		{c.b, "xenblkd_lease_handovers_total", "1"},
		{c.b, "xenblkd_lease_handovers_overdue_total", "0"},
		{c.a, "xenblkd_lease_acquired_total", "1"},
		{c.a, "xenblkd_lease_refused_total", "1"},
		{c.a, `xenblkd_leases{mode="exclusive"}`, "0"},
	} {
		if got := m.h.metric(t, m.series); got != m.want {
			t.Errorf("%s: %s = %s, want %s", m.h.name, m.series, got, m.want)
		}
	}
	c.b.remove(t, b7)
}

// TestClusterHandoverOverdue: a source that does not let go is reported by
// the destination once --cluster-handover has passed (log, metrics, status
// still pending), and the hand-over still completes when it does.
func TestClusterHandoverOverdue(t *testing.T) {
	c := newCluster(t, "--cluster-handover", "500ms")
	_, a1, b7 := c.migrating(t, "disk6.img")
	waitFor(t, 10*time.Second, "overdue hand-over counted", func() bool {
		return c.b.metric(t, "xenblkd_lease_handovers_overdue_total") == "1"
	})
	// The line is logged before the count; it reaches the test through a pipe.
	waitFor(t, 5*time.Second, "B's log line of the overdue hand-over, naming hostA", func() bool {
		log := logText(c.b.d)
		return strings.Contains(log, "lease hand-over not complete") && strings.Contains(log, "hostA")
	})
	if got := c.b.leaseModes(t); got != "pending" {
		t.Fatalf("B's lease while A holds it: %q, want pending", got)
	}
	c.a.remove(t, a1)
	waitFor(t, 10*time.Second, "hand-over to B", func() bool { return c.b.leaseModes(t) == "exclusive" })
	c.b.remove(t, b7)
}

// TestClusterMigrationNotOvertaken: while a migration's destination waits
// for the lease, another VM on the source cannot take it in the moment
// between the source's release and the destination's retry. The
// destination's daemon is stopped (SIGSTOP) to hold that moment open.
func TestClusterMigrationNotOvertaken(t *testing.T) {
	c := newCluster(t)
	lun, a1, b7 := c.migrating(t, "disk5.img")
	if err := c.b.d.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	cont := func() {
		if stopped {
			c.b.d.cmd.Process.Signal(syscall.SIGCONT)
			stopped = false
		}
	}
	t.Cleanup(cont)
	c.a.remove(t, a1) // A lets go; B cannot retry
	a2 := c.a.disk(t, 2, lun, "w", "/vm/oooo")
	c.a.refused(t, a2, "hostB", "/vm/mmmm", "migrated there")
	c.a.removeNodes(a2)
	cont()
	waitFor(t, 10*time.Second, "hand-over to B", func() bool { return c.b.leaseModes(t) == "exclusive" })
	c.b.remove(t, b7)
}

// TestClusterHostDeath: host A's sanlock dies (its host stops renewing its
// delta lease): B stays refused until A's lease expires on sanlock's
// timeouts (8*io_timeout + 60 s), then gets the disk.
func TestClusterHostDeath(t *testing.T) {
	if testing.Short() {
		// Not an environment gate (plain t.Skip): -short asks for a quick
		// run, and this case waits for a dead host's lease to expire.
		t.Skip("-short: waits for a dead host's lease to expire (~70 s)")
	}
	if build.SanitizedEntry() {
		// make test-unit runs this package twice, the second time for the C
		// entry built with ASan and UBSan. This case drives the entry only as
		// TestClusterTwoHosts does (adds that succeed, adds the daemon refuses,
		// handed over to the Go entry); its ~75 s are sanlock's lease expiry,
		// which does not depend on the entry and the normal run tests.
		// Not an environment gate (plain t.Skip): a choice of pass.
		t.Skip("sanitized-entry run: the entry's paths here are TestClusterTwoHosts's; the lease expiry is tested by the normal run")
	}
	c := newCluster(t)
	lun := c.lun(t, "disk4.img")
	a1 := c.a.disk(t, 1, lun, "w", "/vm/aaaa")
	c.a.mustAdd(t, a1)
	if err := c.a.san.Kill(); err != nil {
		t.Fatal(err)
	}
	died := time.Now()
	var refusals int
	for {
		b2 := c.b.disk(t, 2, lun, "w", "/vm/bbbb")
		stderr, code, _ := c.b.add(t, b2)
		if code == 0 {
			break
		}
		if !strings.Contains(stderr, "hostA") {
			t.Fatalf("B's add refused for another reason: %s", stderr)
		}
		refusals++
		c.b.removeNodes(b2)
		if time.Since(died) > 3*time.Minute {
			t.Fatal("B still refused 3 minutes after A's death")
		}
		time.Sleep(500 * time.Millisecond)
	}
	expiry := time.Since(died)
	t.Logf("CASE host death: B refused %d times, allowed %v after A's sanlock was killed", refusals, expiry)
	// Not before: sanlock waits at least the watchdog's 60 s on top of the
	// missed renewals before another host may take a dead host's lease.
	if expiry < 60*time.Second {
		t.Fatalf("B got the disk %v after A died: before A's watchdog would have fired (60 s)", expiry)
	}
}

// TestClusterLoopOfUnnamedFile: a loop device whose file's name the kernel
// cannot give (sysfs loop/backing_file fails with ENAMETOOLONG for a path
// longer than a page) is refused while shares are configured: it could be a
// shared file's, and an unleased attach would protect nothing.
func TestClusterLoopOfUnnamedFile(t *testing.T) {
	c := newCluster(t)
	// A directory chain under the share deeper than PATH_MAX, made with
	// mkdirat/openat (a path that long cannot be passed to a syscall).
	dir, err := unix.Open(c.share, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	name := strings.Repeat("d", 250)
	for range 20 { // 20 * 251 bytes > 4096
		if err := unix.Mkdirat(dir, name, 0o700); err != nil {
			t.Fatal(err)
		}
		next, err := unix.Openat(dir, name, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
		unix.Close(dir)
		if err != nil {
			t.Fatal(err)
		}
		dir = next
	}
	t.Cleanup(func() { os.RemoveAll(filepath.Join(c.share, name)) })
	fd, err := unix.Openat(dir, "disk.img", unix.O_CREAT|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	unix.Close(dir)
	if err != nil {
		t.Fatal(err)
	}
	img := os.NewFile(uintptr(fd), "disk.img")
	defer img.Close()
	if err := img.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	dev, err := loop.Attach(img, loop.Options{Tag: "xenblkd-test-unnamed"}) // AUTOCLEAR: freed by Close
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dev.Close() })
	if _, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/loop/backing_file", dev.Number())); !errors.Is(err, syscall.ENAMETOOLONG) {
		t.Fatalf("sysfs backing_file of %s: %v, want ENAMETOOLONG (the case this test is about)", dev.Path(), err)
	}
	a1 := c.a.disk(t, 1, dev.Path(), "w", "/vm/aaaa")
	c.a.refused(t, a1, "could not be read", dev.Path())
}
