// Package recovery_test tests xenblkd's recovery after restarts and crashes
// (issue 5) against real peers: the built binary (CGO_ENABLED=0), a private
// real C xenstored, real loop devices, a blkback stand-in that opens
// physical-device by major:minor, and, for the fd store, a real systemd 252
// as PID 1 of the test/systemd sandbox. The hotplug entry is exec'd from the
// host against the daemon's API socket, as libxl would exec it.
//
// Every loop device the daemons make carries the tag xenblkd-test:rec-<pid>;
// the tests count, and only ever close, their own devices.
package recovery_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/loop"
	"xenblkd/internal/testenv"
	"xenblkd/internal/xenstore"
	"xenblkd/test/build"
	"xenblkd/test/libxl"
	"xenblkd/test/looptest"
	"xenblkd/test/systemd"
	"xenblkd/test/xenstored"
)

var (
	binDir string            // holds the built xenblkd (bound read-only into sandboxes)
	binary string            // binDir/xenblkd
	entry  string            // binDir/xenblkd-hotplug: the C entry, handing over to binary
	xsd    *xenstored.Daemon // one private C xenstored for the package
	xs     *xenstore.Client  // the test's own connection (libxl's and blkback's role)
	tag    string            // lo_file_name of every device this run's daemons make
)

func TestMain(m *testing.M) { os.Exit(testMain(m)) }

func testMain(m *testing.M) int {
	if os.Getuid() != 0 {
		return testenv.SkipPackage("needs root: loop devices, a private xenstored")
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		return testenv.SkipPackage(fmt.Sprintf("no /dev/loop-control (a kernel without loop devices): %v", err))
	}
	var err error
	// Not under /tmp's test dirs: the sandbox binds it at the same path.
	if binDir, err = os.MkdirTemp("", "xb-rec-bin-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(binDir)
	os.Chmod(binDir, 0o755)
	if binary, err = build.Xenblkd(binDir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if entry, err = build.TestEntry(binDir, binary); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	d, stop, err := xenstored.StartMain(xenstored.C)
	if err != nil {
		fmt.Fprintln(os.Stderr, "start xenstored:", err)
		return 1
	}
	defer stop()
	xsd = d
	if xs, err = xenstore.DialUnix(context.Background(), d.Socket); err != nil {
		fmt.Fprintln(os.Stderr, "dial xenstored:", err)
		return 1
	}
	defer xs.Close()
	tag = fmt.Sprintf("xenblkd-test:rec-%d", os.Getpid())
	return testenv.Run(m)
}

// privateDir is a 0700 directory under /tmp removed at cleanup. Short paths:
// unix socket paths are limited to 108 bytes.
func privateDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// daemonCtl is a running xenblkd daemon the tests can crash.
type daemonCtl interface {
	Socket() string
	// Kill9 sends SIGKILL to the daemon and returns once a new one serves
	// (started by hand, or by systemd's Restart=always).
	Kill9(t testing.TB)
	Log() string
}

// waitServing polls the API until a status request is answered. alive
// reports whether waiting still makes sense.
func waitServing(t testing.TB, socket string, alive func() error) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		resp, err := api.Call(ctx, socket, api.Request{Op: api.OpStatus})
		cancel()
		if err == nil && resp.OK {
			return
		}
		if aerr := alive(); aerr != nil {
			t.Fatalf("daemon did not come up: %v (last status: %v)", aerr, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon does not answer on %s: %v", socket, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// procDaemon is `xenblkd daemon` as a plain subprocess: no systemd, so no
// fd store; a restart recovers from XenStore alone.
type procDaemon struct {
	t       testing.TB
	socket  string
	logPath string
	args    []string // more daemon flags

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

func startProc(t testing.TB, args ...string) *procDaemon {
	dir := privateDir(t, "xb-rec-")
	p := &procDaemon{t: t, socket: filepath.Join(dir, "api.sock"), logPath: filepath.Join(dir, "daemon.log"), args: args}
	p.start()
	t.Cleanup(func() {
		p.mu.Lock()
		cmd, exited := p.cmd, p.exited
		p.mu.Unlock()
		cmd.Process.Signal(syscall.SIGTERM)
		<-exited
		if t.Failed() {
			t.Logf("daemon log (tail):\n%s", tail(p.Log(), 60))
		}
	})
	return p
}

func (p *procDaemon) start() {
	p.t.Helper()
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		p.t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(binary, append([]string{"daemon", "--socket", p.socket, "--tag", tag}, p.args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "XENSTORED_PATH=" + xsd.Socket}
	cmd.Stderr = logf
	if err := cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	p.mu.Lock()
	p.cmd, p.exited = cmd, exited
	p.mu.Unlock()
	waitServing(p.t, p.socket, func() error {
		select {
		case <-exited:
			return fmt.Errorf("exited: %v", cmd.ProcessState)
		default:
			return nil
		}
	})
}

func (p *procDaemon) Socket() string { return p.socket }

func (p *procDaemon) Kill9(t testing.TB) {
	p.kill()
	p.start()
}

// kill sends SIGKILL (by pid: our own child) and waits until it is reaped.
func (p *procDaemon) kill() {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.mu.Unlock()
	cmd.Process.Signal(syscall.SIGKILL)
	<-exited
}

func (p *procDaemon) Log() string {
	b, _ := os.ReadFile(p.logPath)
	return string(b)
}

// unitDaemon is the built binary running as xenblkd.service, derived from
// dist/xenblkd.service, under a real systemd 252 in the sandbox.
type unitDaemon struct {
	sbx     *systemd.Sandbox
	socket  string
	logPath string
}

const unitName = "xenblkd.service"

// startUnit boots a sandbox running xenblkd as a unit. binds are extra host
// paths the daemon needs (image directories).
func startUnit(t testing.TB, binds ...string) *unitDaemon {
	t.Helper()
	unit, err := os.ReadFile("../../dist/xenblkd.service")
	if err != nil {
		t.Fatal(err)
	}
	dir := privateDir(t, "xb-rec-")
	u := &unitDaemon{socket: filepath.Join(dir, "api.sock"), logPath: filepath.Join(dir, "daemon.log")}
	execStart := regexp.MustCompile(`(?m)^ExecStart=/usr/sbin/xenblkd daemon.*\n`)
	s := string(unit)
	if !execStart.MatchString(s) || !strings.Contains(s, "[Unit]\n") || !strings.Contains(s, "StartLimitBurst=50\n") {
		t.Fatalf("dist/xenblkd.service changed: no %q, [Unit] or StartLimitBurst=50", execStart)
	}
	// The sandbox has no Xen: drop the unit's Xen condition.
	s = regexp.MustCompile(`(?m)^ConditionPathExists=.*\n`).ReplaceAllString(s, "")
	// Sandbox only: no default dependencies; the test's binary, socket,
	// xenstored and tag; logs to a bound file. The chaos test crashes the
	// daemon hundreds of times a minute: the start limit is raised (the
	// sandbox takes no drop-in directories, so it is edited in place).
	s = strings.Replace(s, "[Unit]\n", "[Unit]\nDefaultDependencies=no\n", 1)
	s = strings.Replace(s, "StartLimitBurst=50\n", "StartLimitBurst=100000\n", 1)
	s = execStart.ReplaceAllLiteralString(s, fmt.Sprintf(
		"ExecStart=%s daemon --socket %s --tag %s\nEnvironment=XENSTORED_PATH=%s\n"+
			"StandardOutput=append:%s\nStandardError=append:%s\n",
		binary, u.socket, tag, xsd.Socket, u.logPath, u.logPath))
	// dist/xenblkd.socket, listening on the test's socket.
	sock, err := os.ReadFile("../../dist/xenblkd.socket")
	if err != nil {
		t.Fatal(err)
	}
	const listen = "ListenStream=/run/xenblkd/api.sock\n"
	if !strings.Contains(string(sock), listen) || !strings.Contains(string(sock), "[Unit]\n") {
		t.Fatalf("dist/xenblkd.socket changed: no %q or [Unit]", listen)
	}
	socketUnit := strings.Replace(strings.Replace(string(sock), listen, "ListenStream="+u.socket+"\n", 1),
		"[Unit]\n", "[Unit]\nDefaultDependencies=no\n", 1)
	sbinds := []systemd.Bind{{Path: binDir, ReadOnly: true}, {Path: dir}, {Path: xsd.Dir}}
	for _, b := range binds {
		sbinds = append(sbinds, systemd.Bind{Path: b})
	}
	u.sbx = systemd.Start(t, systemd.Options{
		Units: map[string]string{
			"xenblkd-test.target": "[Unit]\nDefaultDependencies=no\nWants=xenblkd.service\nAfter=xenblkd.service\n",
			unitName:              s,
			"xenblkd.socket":      socketUnit,
		},
		Target:   "xenblkd-test.target",
		Binds:    sbinds,
		LogLevel: "info",
	})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log (tail):\n%s", tail(u.Log(), 60))
			console, _ := os.ReadFile(u.sbx.ConsoleLog())
			t.Logf("systemd console (tail):\n%s", tail(string(console), 40))
		}
	})
	waitServing(t, u.socket, u.alive)
	return u
}

func (u *unitDaemon) Socket() string { return u.socket }

func (u *unitDaemon) Log() string {
	b, _ := os.ReadFile(u.logPath)
	return string(b)
}

func (u *unitDaemon) alive() error {
	if st, _ := u.sbx.Show(unitName, "ActiveState"); st == "failed" {
		return fmt.Errorf("%s failed", unitName)
	}
	return nil
}

func (u *unitDaemon) mainPID(t testing.TB) string {
	t.Helper()
	pid, err := u.sbx.Show(unitName, "MainPID")
	if err != nil {
		t.Fatalf("MainPID: %v", err)
	}
	return pid
}

// Kill9 kills the main pid (inside the sandbox) and waits for systemd's
// Restart=always to bring up a new one that serves.
func (u *unitDaemon) Kill9(t testing.TB) {
	t.Helper()
	old := u.mainPID(t)
	if out, err := u.sbx.Exec("kill", "-9", old); err != nil {
		t.Fatalf("kill -9 %s: %v: %s", old, err, out)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if pid := u.mainPID(t); pid != old && pid != "0" && pid != "" {
			break
		}
		if err := u.alive(); err != nil || time.Now().After(deadline) {
			t.Fatalf("no new main pid after kill -9 %s: %v", old, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	waitServing(t, u.socket, u.alive)
}

func (u *unitDaemon) systemctl(t testing.TB, args ...string) {
	t.Helper()
	if out, err := u.sbx.Systemctl(args...); err != nil {
		t.Fatalf("systemctl %v: %v: %s", args, err, out)
	}
}

func (u *unitDaemon) storedFds(t testing.TB) int {
	n, _ := u.sbx.Show(unitName, "NFileDescriptorStore")
	v, _ := strconv.Atoi(n)
	return v
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// --- backends, the hotplug entry, the blkback stand-in -------------------

type key struct{ domid, devid int }

func (k key) be() string { return fmt.Sprintf("backend/vbd/%d/%d", k.domid, k.devid) }

func abs(p string) string { return "/local/domain/0/" + p }

// setupBackend writes the nodes libxl writes before it runs the script, with
// state=2 (blkback's InitWait) already in place.
func setupBackend(t testing.TB, k key, params, mode, script string) {
	t.Helper()
	disk := libxl.Disk{Domid: k.domid, Devid: k.devid, Params: params, Mode: mode, Script: script, State: 2}
	if err := libxl.Write(context.Background(), xs, disk); err != nil {
		t.Fatal(err)
	}
}

func rmBackend(k key) { xs.Rm(context.Background(), abs(k.be())) }

func readNode(t testing.TB, path string) (string, bool) {
	t.Helper()
	v, err := xs.Read(context.Background(), abs(path))
	if errors.Is(err, unix.ENOENT) {
		return "", false
	}
	if err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return v, true
}

// hotplug execs the entry point (the C entry, as installed) as libxl does;
// it returns stderr and the exit code. A daemon that is down is waited for
// 1 s (not the default 10 s), so adds while it is down still fail; extraEnv
// may change that.
func hotplug(t testing.TB, d daemonCtl, action string, k key, extraEnv ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(entry, action)
	cmd.Env = append(libxl.ScriptEnv("/etc/xen/scripts/xenblkd", k.be()), "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"XENBLKD_SOCKET="+d.Socket(), "XENSTORED_PATH="+xsd.Socket, "XENBLKD_CONNECT_TIMEOUT=1s")
	cmd.Env = append(cmd.Env, extraEnv...) // the last of a duplicate key wins
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("exec %s %s: %v", entry, action, err)
	}
	return string(out), 0
}

func mustHotplug(t testing.TB, d daemonCtl, action string, k key) {
	t.Helper()
	if out, code := hotplug(t, d, action, k); code != 0 {
		t.Fatalf("%s %s: exit %d: %s", action, k.be(), code, out)
	}
}

// removeUntilDone runs remove until the daemon answers it (it may be down
// or restarting): what libxl does after a failed add, and an administrator
// after a failed remove.
func removeUntilDone(t testing.TB, d daemonCtl, k key) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		out, code := hotplug(t, d, "remove", k)
		if code == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("remove %s keeps failing: %s", k.be(), out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// attached is what a completed add left: physical-device and diskseq as
// written, and the stand-in's fd (-1 if it does not hold the device).
type attached struct {
	rdev    uint64
	diskseq uint64 // 0 for block devices
	vm      int
}

// readAttached reads physical-device and diskseq of k.
func readAttached(t testing.TB, k key) (attached, error) {
	t.Helper()
	pd, ok := readNode(t, k.be()+"/physical-device")
	if !ok {
		return attached{}, fmt.Errorf("%s/physical-device is missing", k.be())
	}
	var major, minor uint32
	if n, err := fmt.Sscanf(pd, "%x:%x", &major, &minor); n != 2 || err != nil {
		return attached{}, fmt.Errorf("physical-device %q", pd)
	}
	a := attached{rdev: unix.Mkdev(major, minor), vm: -1}
	// diskseq only for loop devices xenblkd made (a phy target may be a
	// loop device too, but gets none).
	if s, ok := readNode(t, k.be()+"/diskseq"); ok {
		if a.diskseq, _ = strconv.ParseUint(s, 16, 64); a.diskseq == 0 {
			return attached{}, fmt.Errorf("diskseq %q", s)
		}
	}
	return a, nil
}

// hold opens the device as blkback does (by dev_t, through a node in a
// private directory) and checks it is still the binding XenStore records.
func hold(t testing.TB, a *attached) error {
	t.Helper()
	node := filepath.Join(t.TempDir(), "blk")
	if err := unix.Mknod(node, unix.S_IFBLK|0o600, int(a.rdev)); err != nil {
		return err
	}
	defer os.Remove(node)
	fd, err := unix.Open(node, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %d:%d as blkback would: %w", unix.Major(a.rdev), unix.Minor(a.rdev), err)
	}
	if a.diskseq != 0 {
		seq, err := unix.IoctlGetUint64(fd, unix.BLKGETDISKSEQ)
		if err != nil || seq != a.diskseq {
			unix.Close(fd)
			return fmt.Errorf("device %d:%d has diskseq %d (%v), XenStore says %d: gone or reused",
				unix.Major(a.rdev), unix.Minor(a.rdev), seq, err, a.diskseq)
		}
	}
	a.vm = fd
	return nil
}

func (a *attached) release() {
	if a.vm >= 0 {
		unix.Close(a.vm)
		a.vm = -1
	}
}

// --- images -----------------------------------------------------------------

// images are the backing files this run made (makeImage), by the paths
// sysfs shows for them: this run's loop devices are the ones bound to them.
var images sync.Map

// makeImage creates a sparse 1 MiB image in dir. Its name starts with this
// process's id: sysfs shows the backing file of a device made inside the
// systemd sandbox, where dir is a bind mount, as /<name>, and that must name
// no other test run's file.
func makeImage(t testing.TB, dir, name string) string {
	t.Helper()
	name = fmt.Sprintf("xbrec%d-%s", os.Getpid(), name)
	p := filepath.Join(dir, name)
	images.Store(p, true)
	images.Store("/"+name, true)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString("XENBLKD-RECOVERY " + name); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	return p
}

// losetup binds a loop device for a phy target (not ours: no tag); cleanup
// detaches it only while it still carries this binding.
func losetup(t testing.TB, file string) string {
	t.Helper()
	return looptest.Losetup(t, file).Path
}

// ourBindings lists the bound loop devices backed by this run's images. It
// finds them in sysfs and opens only them: opening every device of the
// host, as loop.List does, would make this test an opener of other tests'
// devices, whose release (AUTOCLEAR, losetup -d) then waits for it.
func ourBindings(t testing.TB) []loop.Binding {
	t.Helper()
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []loop.Binding
	for _, f := range files {
		backing, err := os.ReadFile(f)
		if err != nil {
			continue // cleared meanwhile
		}
		if _, ok := images.Load(strings.TrimSpace(string(backing))); !ok {
			continue
		}
		number, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(filepath.Dir(filepath.Dir(f))), "loop"))
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if b, ok := bindingOf(t, number); ok {
			out = append(out, b)
		}
	}
	slices.SortFunc(out, func(a, b loop.Binding) int { return a.Number - b.Number })
	return out
}

// bindingOf reads loop device number's binding (ok false if it is not
// bound), opening that device only.
func bindingOf(t testing.TB, number int) (loop.Binding, bool) {
	t.Helper()
	for {
		text, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/diskseq", number))
		if errors.Is(err, fs.ErrNotExist) {
			return loop.Binding{}, false
		}
		if err != nil {
			t.Fatal(err)
		}
		seq, err := strconv.ParseUint(strings.TrimSpace(string(text)), 10, 64)
		if err != nil {
			t.Fatalf("loop%d diskseq %q: %v", number, text, err)
		}
		d, err := loop.Open(number, seq)
		switch {
		case errors.Is(err, loop.ErrDiskSeqMismatch):
			continue // rebound since sysfs said: read it again
		case errors.Is(err, loop.ErrNotBound), errors.Is(err, unix.ENXIO), errors.Is(err, unix.ENOENT):
			return loop.Binding{}, false
		case err != nil:
			t.Fatalf("open loop%d: %v", number, err)
		}
		b := d.Binding()
		d.Close()
		return b, true
	}
}

// --- invariants -------------------------------------------------------------

// counts are the invariants checked after a restart or a storm.
type counts struct {
	Tagged    int // bound loop devices carrying this run's tag
	Unused    int // ... of which no backend's physical-device+diskseq names: must be 0
	Wrong     int // physical-device not bound to the backend's target with the recorded diskseq: must be 0
	Completed int // completed adds the test expects attached
	Missing   int // ... of which not attached (XenStore or daemon status differ): must be 0
}

func (c counts) String() string {
	return fmt.Sprintf("tagged loop devices %d, without a user %d, wrong devices %d, completed adds %d, not attached %d",
		c.Tagged, c.Unused, c.Wrong, c.Completed, c.Missing)
}

func (c counts) ok() bool { return c.Unused == 0 && c.Wrong == 0 && c.Missing == 0 }

// check computes counts once: want are the completed adds.
func check(t testing.TB, d daemonCtl, want map[key]*attached) (counts, []string) {
	t.Helper()
	var c counts
	var why []string
	ctx := context.Background()
	bindings := ourBindings(t)
	byRdev := map[uint64]loop.Binding{}
	for _, b := range bindings {
		byRdev[b.Rdev] = b
	}
	type user struct{ rdev, diskseq uint64 }
	users := map[user]bool{}
	doms, _ := xs.Directory(ctx, abs("backend/vbd"))
	for _, dom := range doms {
		devs, _ := xs.Directory(ctx, abs("backend/vbd/"+dom))
		for _, dev := range devs {
			domid, _ := strconv.Atoi(dom)
			devid, _ := strconv.Atoi(dev)
			k := key{domid, devid}
			if _, ok := readNode(t, k.be()+"/physical-device"); !ok {
				continue
			}
			a, err := readAttached(t, k)
			params, _ := readNode(t, k.be()+"/params")
			var st unix.Stat_t
			if err == nil {
				err = unix.Stat(params, &st)
			}
			if err == nil {
				users[user{a.rdev, a.diskseq}] = true
				if a.diskseq == 0 {
					if st.Rdev != a.rdev {
						err = fmt.Errorf("phy %s is %x, physical-device %x", params, st.Rdev, a.rdev)
					}
				} else if b, ok := byRdev[a.rdev]; !ok {
					err = fmt.Errorf("loop device %d:%d is not bound", unix.Major(a.rdev), unix.Minor(a.rdev))
				} else if b.DiskSeq != a.diskseq || b.Backing != (loop.FileID{Dev: st.Dev, Ino: st.Ino}) {
					err = fmt.Errorf("%s: diskseq %d backing %v, XenStore %d and %s", b.Path, b.DiskSeq, b.Backing, a.diskseq, params)
				}
			}
			if err != nil {
				c.Wrong++
				why = append(why, fmt.Sprintf("wrong device: %s: %v", k.be(), err))
			}
		}
	}
	for _, b := range bindings {
		if !strings.HasPrefix(b.Tag, tag) {
			continue
		}
		c.Tagged++
		if !users[user{b.Rdev, b.DiskSeq}] {
			c.Unused++
			why = append(why, fmt.Sprintf("without a user: %s diskseq %d", b.Path, b.DiskSeq))
		}
	}
	status := map[key]api.Attachment{}
	resp, err := api.Call(ctx, d.Socket(), api.Request{Op: api.OpStatus})
	if err != nil || !resp.OK {
		t.Fatalf("status: %v %s", err, resp.Error)
	}
	for _, a := range resp.Attachments {
		status[key{int(a.Domid), int(a.Devid)}] = a
	}
	for k, w := range want {
		c.Completed++
		got, err := readAttached(t, k)
		st, ok := status[k]
		switch {
		case err != nil:
			why = append(why, fmt.Sprintf("not attached: %s: %v", k.be(), err))
		case got.rdev != w.rdev || got.diskseq != w.diskseq:
			why = append(why, fmt.Sprintf("not attached: %s: XenStore now %x/%d, was %x/%d", k.be(), got.rdev, got.diskseq, w.rdev, w.diskseq))
		case !ok:
			why = append(why, fmt.Sprintf("not attached: %s is not in the daemon's status", k.be()))
		case st.DiskSeq != w.diskseq || st.PhysicalDevice != fmt.Sprintf("%x:%x", unix.Major(w.rdev), unix.Minor(w.rdev)):
			why = append(why, fmt.Sprintf("not attached: %s: status says %s diskseq %d", k.be(), st.PhysicalDevice, st.DiskSeq))
		default:
			continue
		}
		c.Missing++
	}
	return c, why
}

// settle re-checks while only "without a user" fails: systemd handles
// FDSTOREREMOVE after the daemon's reply, so a released device can take a
// moment to go. Anything else is reported at once.
func settle(t testing.TB, d daemonCtl, want map[key]*attached) (counts, []string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, why := check(t, d, want)
		if c.ok() || c.Wrong != 0 || c.Missing != 0 || time.Now().After(deadline) {
			return c, why
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// tagged counts bound devices with this run's tag.
func tagged(t testing.TB) int {
	t.Helper()
	n := 0
	for _, b := range ourBindings(t) {
		if strings.HasPrefix(b.Tag, tag) {
			n++
		}
	}
	return n
}

// waitNoneTagged waits until no device carries this run's tag (AUTOCLEAR
// after the last close; the fd store's copy goes when systemd handles
// FDSTOREREMOVE) and fails if some stay.
func waitNoneTagged(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for tagged(t) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d loop devices tagged %s still bound after every remove: leaked", tagged(t), tag)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
