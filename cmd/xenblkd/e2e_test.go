package main_test

// End-to-end tests: the built binary (CGO_ENABLED=0, as shipped) and the C
// hotplug entry libxl execs (handing over to it), a daemon
// subprocess on private sockets, the real C xenstored (test/xenstored) and
// real loop devices. Each add/remove is exec'd exactly as libxl (4.17 to 4.20) does it
// (argv [script, action], env XENBUS_*, script, stdin /dev/null) after
// writing the nodes libxl writes; the test then stands in for xen-blkback by
// opening the major:minor from physical-device.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/testenv"
	"xenblkd/internal/xenstore"
	"xenblkd/test/build"
	"xenblkd/test/libxl"
	"xenblkd/test/looptest"
	"xenblkd/test/xenstored"
)

var (
	binary string            // the built xenblkd
	entry  string            // the built C hotplug entry, handing over to binary
	xsd    *xenstored.Daemon // shared C xenstored
	xs     *xenstore.Client  // the test's own connection to it
	tag    string            // lo_file_name of devices this test run's daemons make
)

func TestMain(m *testing.M) { os.Exit(testMain(m)) }

func testMain(m *testing.M) int {
	if os.Getuid() != 0 {
		return testenv.SkipPackage("needs root: loop devices, a private xenstored")
	}
	dir, err := os.MkdirTemp("", "xenblkd-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if binary, err = build.Xenblkd(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if entry, err = build.TestEntry(dir, binary); err != nil {
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
	xs, err = xenstore.DialUnix(context.Background(), d.Socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial xenstored:", err)
		return 1
	}
	defer xs.Close()
	tag = fmt.Sprintf("xenblkd-test:e2e-%d", os.Getpid())
	return testenv.Run(m)
}

// daemon is a running `xenblkd daemon` subprocess.
type daemon struct {
	socket string
	xsPath string
	cmd    *exec.Cmd
	log    *bytes.Buffer
	logw   *syncWriter   // guards log while the daemon runs
	exited chan struct{} // closed once the daemon has been reaped
	killed bool          // SIGKILLed by the test (kill): no clean exit expected
}

// kill SIGKILLs the daemon, as a crash would, and waits until it is reaped.
func (d *daemon) kill(t *testing.T) {
	t.Helper()
	d.killed = true
	if err := d.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-d.exited
}

// startDaemon runs `xenblkd daemon` on a private socket against xenstored
// socket xsPath, and waits until it serves (`xenblkd status` answers).
func startDaemon(t *testing.T, xsPath string, extraArgs ...string) *daemon {
	t.Helper()
	dir, err := os.MkdirTemp("", "xb-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &daemon{socket: filepath.Join(dir, "run", "api.sock"), xsPath: xsPath, log: &bytes.Buffer{}}
	// The daemon says READY=1 on $NOTIFY_SOCKET once it serves, as under systemd.
	notifyPath := filepath.Join(dir, "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { notify.Close() })
	ready := make(chan string, 1)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := notify.Read(buf)
			if err != nil {
				return
			}
			// Keep reading after READY=1: the daemon pushes every loop fd it
			// makes (FDSTORE=1); reading without a control buffer closes them,
			// as they must be, or the queued copies would keep devices bound.
			if msg := string(buf[:n]); strings.Contains(msg, "READY=1") {
				select {
				case ready <- msg:
				default:
				}
			}
		}
	}()
	d.cmd = exec.Command(binary, append([]string{"daemon", "--socket", d.socket, "--tag", tag}, extraArgs...)...)
	d.cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "XENSTORED_PATH=" + xsPath, "NOTIFY_SOCKET=" + notifyPath}
	d.logw = &syncWriter{w: d.log}
	d.cmd.Stderr = d.logw
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	d.exited = exited
	go func() { d.cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		d.cmd.Process.Signal(syscall.SIGTERM)
		<-exited
		if d.killed {
			return
		}
		if code := d.cmd.ProcessState.ExitCode(); code != 0 {
			t.Errorf("daemon exit status after SIGTERM: %d, want 0", code)
		}
		if _, err := os.Stat(d.socket); err == nil {
			t.Errorf("daemon left its socket %s behind", d.socket)
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.log.String())
		}
	})
	select {
	case <-ready:
	case <-exited:
		t.Fatalf("daemon exited before READY=1:\n%s", d.log)
	}
	fi, err := os.Stat(filepath.Dir(d.socket))
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("socket directory: %v, mode %v; want 0700", err, fi.Mode())
	}
	if fi, err := os.Stat(d.socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket: %v, mode %v; want 0600", err, fi.Mode())
	}
	return d
}

type syncWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

func bePath(domid, devid int) string { return fmt.Sprintf("backend/vbd/%d/%d", domid, devid) }

func abs(p string) string { return "/local/domain/0/" + p }

// vbdSetup writes the nodes libxl (4.17 to 4.20) writes for a disk (one transaction;
// params or mode libxl.Omit leaves that node out), then state=2 as blkback's
// probe does.
func vbdSetup(t *testing.T, domid, devid int, params, mode string) string {
	t.Helper()
	ctx := context.Background()
	disk := libxl.Disk{Domid: domid, Devid: devid, Params: params, Mode: mode, Script: "/etc/xen/scripts/xenblkd"}
	if err := libxl.Write(ctx, xs, disk); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { libxl.Remove(ctx, xs, disk) })
	if err := xs.Write(ctx, disk.BackendAbs()+"/state", "2"); err != nil {
		t.Fatal(err)
	}
	return disk.Backend()
}

func read(t *testing.T, path string) (string, bool) {
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

// hotplug runs the script (the C entry, as installed) as libxl does and
// returns its stderr and exit code. A daemon that is not there is waited for
// 300 ms, not the default 10 s.
func hotplug(t *testing.T, d *daemon, action, xenbusPath string, extraEnv ...string) (string, int) {
	t.Helper()
	script := entry
	cmd := exec.Command(script, action) // argv [script, action]; stdin /dev/null
	cmd.Env = append(libxl.ScriptEnv(script, xenbusPath), "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"XENBLKD_SOCKET="+d.socket, "XENSTORED_PATH="+d.xsPath, "XENBLKD_CONNECT_TIMEOUT=300ms")
	cmd.Env = append(cmd.Env, extraEnv...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("exec %s %s: %v", script, action, err)
	}
	return stderr.String(), code
}

func mustHotplug(t *testing.T, d *daemon, action, be string) {
	t.Helper()
	if stderr, code := hotplug(t, d, action, be); code != 0 {
		t.Fatalf("%s %s: exit %d: %s", action, be, code, stderr)
	}
}

// image makes a 1 MiB file starting with a signature.
func image(t *testing.T, name string) (path, signature string) {
	t.Helper()
	path = filepath.Join(t.TempDir(), name)
	signature = fmt.Sprintf("XENBLKD-E2E %s %d", name, time.Now().UnixNano())
	b := make([]byte, 1<<20)
	copy(b, signature)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	images.Store(path, true)
	return path, signature
}

// losetup binds a loop device with util-linux (a "foreign" device, or a phy
// target); cleanup detaches it only while it still carries this binding.
func losetup(t *testing.T, file string, extra ...string) string {
	t.Helper()
	return looptest.Losetup(t, file, extra...).Path
}

// standIn opens physical-device's major:minor the way blkback does (by dev_t,
// through a node made in a private directory), checks the first bytes, and
// returns the open file: the VM's reference.
func standIn(t *testing.T, be, signature string, writable bool) (*os.File, uint64) {
	t.Helper()
	pd, ok := read(t, be+"/physical-device")
	if !ok {
		t.Fatalf("%s/physical-device missing", be)
	}
	var major, minor uint32
	if n, err := fmt.Sscanf(pd, "%x:%x", &major, &minor); n != 2 || err != nil || pd != fmt.Sprintf("%x:%x", major, minor) {
		t.Fatalf("physical-device %q is not lowercase %%x:%%x", pd)
	}
	rdev := unix.Mkdev(major, minor)
	node := filepath.Join(t.TempDir(), "blk")
	if err := unix.Mknod(node, unix.S_IFBLK|0o600, int(rdev)); err != nil {
		t.Fatalf("mknod %s: %v", pd, err)
	}
	flags := os.O_RDONLY
	if writable {
		flags = os.O_RDWR
	}
	f, err := os.OpenFile(node, flags, 0)
	if err != nil {
		t.Fatalf("open %s as blkback would: %v", pd, err)
	}
	t.Cleanup(func() { f.Close() })
	buf := make([]byte, len(signature))
	if _, err := f.ReadAt(buf, 0); err != nil || string(buf) != signature {
		t.Fatalf("device %s reads %q, %v; want %q", pd, buf, err, signature)
	}
	return f, rdev
}

// bound reports whether loop device rdev is bound with the given diskseq.
func bound(rdev, diskseq uint64) bool {
	sys := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(rdev), unix.Minor(rdev))
	if _, err := os.Stat(sys + "/loop/backing_file"); err != nil {
		return false
	}
	b, err := os.ReadFile(sys + "/diskseq")
	return err == nil && strings.TrimSpace(string(b)) == strconv.FormatUint(diskseq, 10)
}

// images are the backing files this run made (image()).
var images sync.Map

// ourDevices lists bound loop devices backed by this run's images. It reads
// sysfs only: opening other loop devices would add an opener and delay their
// owners' AUTOCLEAR on this shared machine.
func ourDevices(t *testing.T) []string {
	t.Helper()
	var out []string
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if _, ok := images.Load(strings.TrimSpace(string(b))); ok {
			out = append(out, "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(f))))
		}
	}
	sort.Strings(out)
	return out
}

// waitNoDevices fails unless, within 5 s, no loop device is bound to this
// run's images: a released device is freed by AUTOCLEAR only once its last
// opener (the fd store's copy, udev's probe) lets go, a moment after remove.
func waitNoDevices(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		devs := ourDevices(t)
		if len(devs) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("devices left 5 s after removing all: %v", devs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func diskseqOf(t *testing.T, be string) uint64 {
	t.Helper()
	v, ok := read(t, be+"/diskseq")
	if !ok {
		t.Fatalf("%s/diskseq missing", be)
	}
	n, err := strconv.ParseUint(v, 16, 64)
	if err != nil || v != strconv.FormatUint(n, 16) {
		t.Fatalf("diskseq %q is not lowercase %%x", v)
	}
	return n
}

func TestAttachDetach(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	tests := []struct {
		name string
		phy  bool
		rel  bool // params relative to /dev, as phy:loopN
		mode string
	}{
		{name: "file rw", mode: "w"},
		{name: "file ro", mode: "r"},
		{name: "phy rw", phy: true, mode: "w"},
		{name: "phy ro", phy: true, mode: "r"},
		{name: "phy relative", phy: true, rel: true, mode: "w"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img, sig := image(t, "disk.img")
			params := img
			if tt.phy {
				params = losetup(t, img)
				if tt.rel {
					params = strings.TrimPrefix(params, "/dev/")
				}
			}
			be := vbdSetup(t, 10+i, 51712, params, tt.mode)
			start := time.Now()
			mustHotplug(t, d, "add", be)
			t.Logf("add took %v", time.Since(start))
			if got, _ := read(t, be+"/hotplug-status"); got != "connected" {
				t.Errorf("hotplug-status = %q, want connected", got)
			}
			vm, rdev := standIn(t, be, sig, tt.mode == "w")
			path, _ := read(t, be+"/physical-device-path")
			var st unix.Stat_t
			if err := unix.Stat(path, &st); err != nil || st.Rdev != rdev {
				t.Errorf("physical-device-path %s: rdev %x, %v; want %x", path, st.Rdev, err, rdev)
			}
			var seq uint64
			if tt.phy {
				if _, ok := read(t, be+"/diskseq"); ok {
					t.Error("diskseq written for a block device")
				}
			} else {
				seq = diskseqOf(t, be)
			}
			out, err := exec.Command(binary, "status", "--socket", d.socket).CombinedOutput()
			if err != nil || !strings.Contains(string(out), path) {
				t.Errorf("status: %v\n%s", err, out)
			}

			start = time.Now()
			mustHotplug(t, d, "remove", be)
			t.Logf("remove took %v", time.Since(start))
			for _, n := range []string{"physical-device", "diskseq"} {
				if _, ok := read(t, be+"/"+n); ok {
					t.Errorf("%s left after remove", n)
				}
			}
			mustHotplug(t, d, "remove", be) // twice: fine
			if !tt.phy {
				if !bound(rdev, seq) {
					t.Fatal("loop device freed while the VM (stand-in) still holds it")
				}
				vm.Close()
				if bound(rdev, seq) {
					t.Fatal("loop device still bound after the last user closed it")
				}
			}
		})
	}
}

func TestSharedReadOnlyImage(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	img, sig := image(t, "base.img")
	var pd string
	var vms []*os.File
	var rdev, seq uint64
	for dom := 100; dom < 120; dom++ {
		be := vbdSetup(t, dom, 51712, img, "r")
		mustHotplug(t, d, "add", be)
		got, _ := read(t, be+"/physical-device")
		if pd == "" {
			pd = got
			seq = diskseqOf(t, be)
		} else if got != pd {
			t.Fatalf("domain %d got %s, want the shared %s", dom, got, pd)
		}
		var vm *os.File
		vm, rdev = standIn(t, be, sig, false)
		vms = append(vms, vm)
	}
	if devs := ourDevices(t); len(devs) != 1 {
		t.Fatalf("20 read-only attachments use %d loop devices %v, want 1", len(devs), devs)
	}
	out, _ := exec.Command(binary, "status", "--json", "--socket", d.socket).Output()
	if !bytes.Contains(out, []byte(`"users": 20`)) {
		t.Errorf("status --json does not show 20 users:\n%s", out)
	}
	for i, dom := 0, 100; dom < 120; i, dom = i+1, dom+1 {
		mustHotplug(t, d, "remove", bePath(dom, 51712))
		vms[i].Close()
		if want := dom < 119; bound(rdev, seq) != want {
			t.Fatalf("after removing domain %d: bound=%v, want %v", dom, !want, want)
		}
	}
}

func TestSharingConflicts(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	type step struct {
		domid, devid int
		mode         string
		wantErr      string // "" = must succeed
	}
	tests := []struct {
		name  string
		phy   bool
		steps []step
	}{
		{"rw vs rw, other domain", false, []step{{201, 1, "w", ""}, {202, 1, "w", "domain 201 device 1 already uses it read-write (mode w"}}},
		{"rw vs ro, other domain", false, []step{{201, 1, "w", ""}, {202, 1, "r", "domain 201 device 1 already uses it read-write"}}},
		{"ro vs rw, other domain", false, []step{{201, 1, "r", ""}, {202, 1, "w", "domain 201 device 1 already uses it read-only (mode r"}}},
		{"ro vs ro, other domain", false, []step{{201, 1, "r", ""}, {202, 1, "r", ""}}},
		{"same domain", false, []step{{201, 1, "w", ""}, {201, 2, "w", ""}, {201, 3, "r", ""}}},
		{"w! overrides", false, []step{{201, 1, "w", ""}, {202, 1, "w!", ""}}},
		{"phy rw vs rw", true, []step{{201, 1, "w", ""}, {202, 1, "w", "domain 201 device 1 already uses it read-write"}}},
		{"phy same domain", true, []step{{201, 1, "w", ""}, {201, 2, "w", ""}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img, _ := image(t, "shared.img")
			params := img
			if tt.phy {
				params = losetup(t, img)
			}
			for _, s := range tt.steps {
				be := vbdSetup(t, s.domid, s.devid, params, s.mode)
				t.Cleanup(func() { hotplug(t, d, "remove", be) })
				stderr, code := hotplug(t, d, "add", be)
				if s.wantErr == "" {
					if code != 0 {
						t.Fatalf("%s mode %s: exit %d: %s", be, s.mode, code, stderr)
					}
					continue
				}
				herr, _ := read(t, be+"/hotplug-error")
				if code == 0 || !strings.Contains(stderr, s.wantErr) || !strings.Contains(herr, s.wantErr) {
					t.Fatalf("%s mode %s: exit %d, stderr %q, hotplug-error %q; want refusal containing %q", be, s.mode, code, stderr, herr, s.wantErr)
				}
				if _, ok := read(t, be+"/physical-device"); ok {
					t.Fatal("physical-device written for a refused attach")
				}
			}
		})
	}
}

func TestForeignLoopDevice(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	img, sig := image(t, "foreign.img")
	foreign := losetup(t, img)
	be := vbdSetup(t, 301, 51712, img, "w")
	stderr, code := hotplug(t, d, "add", be)
	if herr, _ := read(t, be+"/hotplug-error"); code == 0 || !strings.Contains(herr, foreign) || !strings.Contains(stderr, foreign) {
		t.Fatalf("rw add with foreign %s: exit %d, stderr %q, hotplug-error %q; want a refusal naming it", foreign, code, stderr, herr)
	}
	be2 := vbdSetup(t, 302, 51712, img, "r")
	mustHotplug(t, d, "add", be2)
	standIn(t, be2, sig, false)
	mustHotplug(t, d, "remove", be2)
	be3 := vbdSetup(t, 303, 51712, img, "w!")
	mustHotplug(t, d, "add", be3)
	mustHotplug(t, d, "remove", be3)
}

func TestConcurrentAdds(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	const n = 16
	bes := make([]string, n)
	sigs := make([]string, n)
	for i := range n {
		img, sig := image(t, fmt.Sprintf("c%d.img", i))
		bes[i], sigs[i] = vbdSetup(t, 400+i, 51712, img, "w"), sig
	}
	var wg sync.WaitGroup
	start := time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if stderr, code := hotplug(t, d, "add", bes[i]); code != 0 {
				t.Errorf("add %s: exit %d: %s", bes[i], code, stderr)
			}
		}()
	}
	wg.Wait()
	t.Logf("%d concurrent adds took %v", n, time.Since(start))
	if t.Failed() {
		return
	}
	seen := map[string]bool{}
	for i := range n {
		pd, _ := read(t, bes[i]+"/physical-device")
		if seen[pd] {
			t.Fatalf("physical-device %s given twice", pd)
		}
		seen[pd] = true
		vm, _ := standIn(t, bes[i], sigs[i], true)
		vm.Close()
	}
	for i := range n {
		wg.Add(1)
		go func() { defer wg.Done(); hotplug(t, d, "remove", bes[i]) }()
	}
	wg.Wait()
	waitNoDevices(t)
}

func TestRemoveWhenBackendGone(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	img, sig := image(t, "gone.img")
	be := vbdSetup(t, 501, 51712, img, "w")
	mustHotplug(t, d, "add", be)
	vm, rdev := standIn(t, be, sig, true)
	seq := diskseqOf(t, be)
	if err := xs.Rm(context.Background(), abs(be)); err != nil { // forced destroy
		t.Fatal(err)
	}
	mustHotplug(t, d, "remove", be)
	mustHotplug(t, d, "remove", be)
	if _, ok := read(t, be); ok {
		t.Fatal("remove recreated the backend directory")
	}
	vm.Close()
	// The fd store's copy of the fd travels in a notify datagram the test's
	// reader discards asynchronously (startDaemon): wait for it, not race it.
	waitUntil(t, "the loop device to be freed after remove and the last close", func() bool { return !bound(rdev, seq) })
}

func TestBadInput(t *testing.T) {
	// Without pre-setup: the "daemon not running" case must not find its
	// backend attached by this daemon (presetup_e2e_test.go covers bad input
	// pre-setup meets first).
	d := startDaemon(t, xsd.Socket, "--presetup=false")
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	roImg, _ := image(t, "ro.img")
	os.Chmod(roImg, 0o444)
	emptyImg := filepath.Join(dir, "empty.img")
	if err := os.WriteFile(emptyImg, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	img, _ := image(t, "ok.img")
	nowhere := &daemon{socket: filepath.Join(dir, "no-daemon.sock"), xsPath: xsd.Socket}

	tests := []struct {
		name         string
		params, mode string // "\x00": node not written
		action       string
		xenbusPath   string // "" = the backend's; "-" = unset
		d            *daemon
		want         string
		wantRecorded bool // the message must be in hotplug-error
	}{
		{"missing params", "\x00", "w", "add", "", d, "params is missing", true},
		{"empty params", "", "w", "add", "", d, "params is empty", true},
		{"relative params, no such node", "xenblkd-no-such-disk", "w", "add", "", d, "no such device /dev/xenblkd-no-such-disk", true},
		{"nonexistent path", "/nonexistent/disk.img", "w", "add", "", d, "no such file or device", true},
		{"directory", dir, "w", "add", "", d, "is a directory", true},
		{"FIFO", fifo, "w", "add", "", d, "is a FIFO", true},
		{"character device", "/dev/null", "w", "add", "", d, "is a character device", true},
		{"writable mode on read-only file", roImg, "w", "add", "", d, "the file is read-only", true},
		{"writable mode on empty file", emptyImg, "w", "add", "", d, "the file is empty (0 bytes) but mode is w", true},
		{"unknown mode", img, "rx", "add", "", d, `unknown mode "rx"`, true},
		{"missing mode", img, "\x00", "add", "", d, "mode is missing", true},
		{"oversized params", "/" + strings.Repeat("x", 3000), "w", "add", "", d, "the limit is 1024", true},
		{"oversized mode", img, strings.Repeat("w", 100), "add", "", d, "the limit is 8", true},
		{"malformed XENBUS_PATH", img, "w", "add", "backend/vbd/x/51712", d, "malformed XENBUS_PATH", false},
		{"missing XENBUS_PATH", img, "w", "add", "-", d, "XENBUS_PATH: it is empty or unset", false},
		{"unknown action", img, "w", "online", "", d, `unknown action "online"`, true},
		{"daemon not running", img, "w", "add", "", nowhere, "xenblkd daemon is not running", true},
	}
	before := ourDevices(t)
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			be := vbdSetup(t, 600+i, 51712, tt.params, tt.mode)
			var env []string
			switch tt.xenbusPath {
			case "":
			case "-":
				env = []string{"XENBUS_PATH="}
			default:
				env = []string{"XENBUS_PATH=" + tt.xenbusPath}
			}
			stderr, code := hotplug(t, tt.d, tt.action, be, env...)
			if code == 0 || !strings.Contains(stderr, tt.want) {
				t.Fatalf("exit %d, stderr %q; want non-zero and %q", code, stderr, tt.want)
			}
			herr, ok := read(t, be+"/hotplug-error")
			if tt.wantRecorded && (!ok || !strings.Contains(herr, tt.want)) {
				t.Errorf("hotplug-error = %q; want it to contain %q", herr, tt.want)
			}
			if !tt.wantRecorded && ok {
				t.Errorf("hotplug-error = %q written for an unknown backend", herr)
			}
			for _, n := range []string{"physical-device", "physical-device-path", "diskseq"} {
				if v, ok := read(t, be+"/"+n); ok {
					t.Errorf("%s = %q left behind", n, v)
				}
			}
			t.Logf("stderr: %s", strings.TrimSpace(stderr))
		})
	}
	if after := ourDevices(t); len(after) != len(before) {
		t.Errorf("loop devices before %v, after %v", before, after)
	}
}

func TestXenStoreUnreachable(t *testing.T) {
	own := xenstored.Start(t, xenstored.C)
	d := startDaemon(t, own.Socket)
	img, _ := image(t, "x.img")
	if err := own.Kill(); err != nil {
		t.Fatal(err)
	}
	stderr, code := hotplug(t, d, "add", bePath(700, 51712))
	if code == 0 || !strings.Contains(strings.ToLower(stderr), "xenstore") {
		t.Fatalf("exit %d, stderr %q; want a failure that names XenStore", code, stderr)
	}
	t.Logf("stderr: %s", strings.TrimSpace(stderr))
	_ = img
	if devs := ourDevices(t); len(devs) != 0 {
		t.Errorf("devices left: %v", devs)
	}
}

// TestRepeatedAddRemove runs 30 add/remove cycles through the exec'd entry
// point: each must succeed and none may leave a loop device behind. It also
// logs rough times (speed itself is for make bench, never asserted here).
func TestRepeatedAddRemove(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	const n = 30
	var adds, removes []time.Duration
	for i := range n {
		// A fresh image each time (see TestPresetupRepeatedAddRemove).
		img, _ := image(t, fmt.Sprintf("lat-%d.img", i))
		be := vbdSetup(t, 800+i, 51712, img, "w")
		t0 := time.Now()
		mustHotplug(t, d, "add", be)
		t1 := time.Now()
		mustHotplug(t, d, "remove", be)
		adds, removes = append(adds, t1.Sub(t0)), append(removes, time.Since(t1))
	}
	for _, ds := range [][]time.Duration{adds, removes} {
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	}
	t.Logf("file rw, exec to exit, n=%d: add median %v (min %v, max %v); remove median %v (min %v, max %v)",
		n, adds[n/2], adds[0], adds[n-1], removes[n/2], removes[0], removes[n-1])
	waitNoDevices(t)
}
