package systemd_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/fdstore"
	"xenblkd/test/systemd"
)

// TestFDStoreLifetime runs testdata/fdsvc as a Type=notify unit under a real
// systemd and checks what happens to its stored loop device fd on restart,
// SIGKILL (Restart=always), daemon-reexec, FDSTOREREMOVE, stop, and teardown.
func TestFDStoreLifetime(t *testing.T) {
	bin, data, image, events := prepareFdsvc(t)

	// Registered before Start, so it runs after the sandbox's teardown, also
	// when the test fails half-way: every binding made must be gone.
	var attached []string
	t.Cleanup(func() {
		for _, name := range attached {
			number, diskseq, _ := fdstore.ParseLoopName(name)
			waitCleared(t, number, diskseq)
		}
	})

	sbx := systemd.Start(t, systemd.Options{
		Units: map[string]string{
			"fdsvc.target": "[Unit]\nDefaultDependencies=no\nWants=fdsvc.service\n",
			"fdsvc.service": fmt.Sprintf(`[Unit]
DefaultDependencies=no
[Service]
Type=notify
ExecStart=%s %s %s
FileDescriptorStoreMax=16
Restart=always
RestartSec=100ms
StandardOutput=append:%s/svc.log
StandardError=append:%s/svc.log
`, filepath.Join(bin, "fdsvc"), image, events, data, data),
		},
		Target: "fdsvc.target",
		Binds:  []systemd.Bind{{Path: bin, ReadOnly: true}, {Path: data}},
	})
	svc := &service{t: t, sbx: sbx, events: events, unit: "fdsvc.service"}

	name := svc.waitEvent(svc.mainPID(), "attached")
	attached = append(attached, name)
	number, diskseq, err := fdstore.ParseLoopName(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("attached /dev/loop%d diskseq %d", number, diskseq)
	svc.wantStored(1)
	watch := watchBinding(t, number, diskseq)

	// restart: the new instance gets the fd back under the same name.
	oldPID := svc.mainPID()
	svc.systemctl("restart", "fdsvc.service")
	pid := svc.mainPID()
	if pid == oldPID {
		t.Fatalf("restart kept MainPID %d", pid)
	}
	svc.wantReceived(pid, name)

	// SIGKILL of the main process: Restart=always brings it back, store kept.
	if out, err := sbx.Exec("kill", "-9", strconv.Itoa(pid)); err != nil {
		t.Fatalf("kill: %v %s", err, out)
	}
	pid = svc.waitNewMainPID(pid)
	svc.wantReceived(pid, name)
	if n := svc.show("NRestarts"); n != "1" {
		t.Errorf("NRestarts = %s after kill -9, want 1", n)
	}

	// daemon-reexec: PID 1 serializes the store and gets it back; the
	// service keeps running, and a restart after it still gets the fd.
	svc.systemctl("daemon-reexec")
	svc.wantStored(1)
	if held := pid1Holds(t, sbx, number); !held {
		t.Errorf("after daemon-reexec, PID 1 holds no fd of /dev/loop%d", number)
	}
	svc.systemctl("restart", "fdsvc.service")
	svc.wantReceived(svc.mainPID(), name)

	if changes := watch(); len(changes) > 0 {
		t.Errorf("/dev/loop%d changed during restart/kill/reexec: %v", number, changes)
	}

	// FDSTOREREMOVE + close of the service's own copy: the device clears.
	svc.systemctl("kill", "--signal=SIGUSR1", "--kill-who=main", "fdsvc.service")
	svc.waitEvent(svc.mainPID(), "removed")
	svc.wantStored(0)
	waitCleared(t, number, diskseq)

	// stop drops the store on systemd 252: the next start attaches afresh.
	svc.systemctl("restart", "fdsvc.service")
	name = svc.waitEvent(svc.mainPID(), "attached")
	attached = append(attached, name)
	number, diskseq, _ = fdstore.ParseLoopName(name)
	svc.wantStored(1)
	svc.systemctl("stop", "fdsvc.service")
	waitCleared(t, number, diskseq)
	svc.systemctl("start", "fdsvc.service")
	name = svc.waitEvent(svc.mainPID(), "attached")
	attached = append(attached, name)
	number, diskseq, _ = fdstore.ParseLoopName(name)
	t.Logf("systemctl stop dropped the store (device cleared); start attached /dev/loop%d afresh", number)

	// Teardown kills everything in the sandbox, PID 1's store included: the
	// device autoclears without anyone detaching it.
	sbx.Close()
	waitCleared(t, number, diskseq)
}

// prepareFdsvc builds testdata/fdsvc (static, as the real binary) into bin
// and makes a 16 MiB image in data; events is fdsvc's events log.
func prepareFdsvc(t *testing.T) (bin, data, image, events string) {
	t.Helper()
	bin = t.TempDir()
	build := exec.Command("go", "build", "-o", filepath.Join(bin, "fdsvc"), "./testdata/fdsvc")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build fdsvc: %v\n%s", err, out)
	}
	data = t.TempDir()
	image = filepath.Join(data, "disk.img")
	if err := os.WriteFile(image, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(image, 16<<20); err != nil {
		t.Fatal(err)
	}
	return bin, data, image, filepath.Join(data, "events.log")
}

type service struct {
	t      *testing.T
	sbx    *systemd.Sandbox
	events string
	unit   string
}

func (s *service) systemctl(args ...string) {
	s.t.Helper()
	if out, err := s.sbx.Systemctl(args...); err != nil {
		s.t.Fatalf("%v\n%s", err, out)
	}
}

func (s *service) show(property string) string {
	s.t.Helper()
	v, err := s.sbx.Show(s.unit, property)
	if err != nil {
		s.t.Fatalf("show %s: %v", property, err)
	}
	return v
}

func (s *service) mainPID() int {
	s.t.Helper()
	pid, err := strconv.Atoi(s.show("MainPID"))
	if err != nil {
		s.t.Fatal(err)
	}
	return pid
}

func (s *service) waitNewMainPID(old int) int {
	s.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if pid := s.mainPID(); pid != 0 && pid != old && s.show("ActiveState") == "active" {
			return pid
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.t.Fatalf("no new main process after %d", old)
	return 0
}

func (s *service) wantStored(n int) {
	s.t.Helper()
	if got := s.show("NFileDescriptorStore"); got != strconv.Itoa(n) {
		s.t.Errorf("NFileDescriptorStore = %s, want %d", got, n)
	}
}

func (s *service) wantReceived(pid int, name string) {
	s.t.Helper()
	if got := s.waitEvent(pid, "received"); got != name {
		s.t.Errorf("pid %d received %q, want %q", pid, got, name)
	}
	s.wantStored(1)
}

// waitEvent waits for "pid=<pid> event=<event> name=<name>" and returns name.
func (s *service) waitEvent(pid int, event string) string {
	s.t.Helper()
	prefix := fmt.Sprintf("pid=%d event=", pid)
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		b, _ := os.ReadFile(s.events)
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, prefix); ok {
				if strings.HasPrefix(rest, "error") {
					s.t.Fatalf("fdsvc: %s", line)
				}
				if rest, ok := strings.CutPrefix(rest, event+" name="); ok {
					name, _, _ := strings.Cut(rest, " ")
					return name
				}
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	b, _ := os.ReadFile(s.events)
	svcLog, _ := os.ReadFile(filepath.Join(filepath.Dir(s.events), "svc.log"))
	s.t.Fatalf("no event %q from pid %d; events:\n%s\nsvc.log:\n%s", event, pid, b, svcLog)
	return ""
}

// binding reads /dev/loopN's state from sysfs without opening the device
// (an open would delay autoclear).
func binding(number int) (bound bool, diskseq uint64) {
	dir := fmt.Sprintf("/sys/block/loop%d", number)
	_, err := os.Stat(dir + "/loop")
	b, _ := os.ReadFile(dir + "/diskseq")
	diskseq, _ = strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	return err == nil, diskseq
}

// watchBinding polls /dev/loopN every millisecond until the returned
// function is called, which returns every observed deviation from
// (bound, diskseq).
func watchBinding(t *testing.T, number int, diskseq uint64) func() []string {
	var (
		mu      sync.Mutex
		changes []string
		stop    = make(chan struct{})
		done    = make(chan struct{})
	)
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			if bound, seq := binding(number); !bound || seq != diskseq {
				mu.Lock()
				if len(changes) < 10 {
					changes = append(changes, fmt.Sprintf("%s: bound=%v diskseq=%d", time.Now().Format(time.StampMicro), bound, seq))
				}
				mu.Unlock()
			}
		}
	}()
	var once sync.Once
	finish := func() []string {
		once.Do(func() { close(stop); <-done })
		mu.Lock()
		defer mu.Unlock()
		return changes
	}
	t.Cleanup(func() { finish() })
	return finish
}

// waitCleared waits until the binding (number, diskseq) is gone: a clear
// bumps diskseq, so this holds even if someone else reuses the number.
func waitCleared(t *testing.T, number int, diskseq uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if bound, seq := binding(number); !bound || seq != diskseq {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Errorf("/dev/loop%d is still bound with diskseq %d", number, diskseq)
}

// pid1Holds reports whether the sandbox's systemd has /dev/loopN open.
func pid1Holds(t *testing.T, sbx *systemd.Sandbox, number int) bool {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", sbx.Pid1())
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		var st unix.Stat_t
		if unix.Stat(filepath.Join(dir, e.Name()), &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK &&
			st.Rdev == unix.Mkdev(7, uint32(number)) {
			return true
		}
	}
	return false
}

// TestFDStorePreserveStopStart: with FileDescriptorStorePreserve=yes (as
// dist/xenblkd.service says), systemd 257 (Debian 13) keeps the store of a
// stopped unit: an idle device stays bound across `systemctl stop` and the
// next start receives it under its name (adopted, not made again); removing
// the unit file and daemon-reload (the package's removal) frees it. systemd
// 252 (Debian 12) ignores the key: stop drops the store and the device, and
// start attaches afresh (docs/fdstore.md).
func TestFDStorePreserveStopStart(t *testing.T) {
	eachRelease(t, testFDStorePreserve)
}

func testFDStorePreserve(t *testing.T, root string) {
	bin, data, image, events := prepareFdsvc(t)
	var attached []string
	t.Cleanup(func() {
		for _, name := range attached {
			number, diskseq, _ := fdstore.ParseLoopName(name)
			waitCleared(t, number, diskseq)
		}
	})
	sbx := systemd.Start(t, systemd.Options{
		Root: root,
		Units: map[string]string{
			"fdsvc.target": "[Unit]\nDefaultDependencies=no\nWants=fdsvc.service\n",
			"fdsvc.service": fmt.Sprintf(`[Unit]
DefaultDependencies=no
[Service]
Type=notify
ExecStart=%s %s %s
FileDescriptorStoreMax=16
FileDescriptorStorePreserve=yes
StandardOutput=append:%s/svc.log
StandardError=append:%s/svc.log
`, filepath.Join(bin, "fdsvc"), image, events, data, data),
		},
		Target: "fdsvc.target",
		Binds:  []systemd.Bind{{Path: bin, ReadOnly: true}, {Path: data}},
	})
	version, _ := sbx.Exec("systemctl", "--version")
	version = strings.SplitN(version, "\n", 2)[0]
	svc := &service{t: t, sbx: sbx, events: events, unit: "fdsvc.service"}
	name := svc.waitEvent(svc.mainPID(), "attached")
	attached = append(attached, name)
	number, diskseq, _ := fdstore.ParseLoopName(name)
	svc.wantStored(1)

	svc.systemctl("stop", "fdsvc.service")
	if strings.HasPrefix(version, "systemd 252 ") {
		waitCleared(t, number, diskseq)
		svc.systemctl("start", "fdsvc.service")
		name = svc.waitEvent(svc.mainPID(), "attached")
		attached = append(attached, name)
		t.Logf("%s: stop dropped the store (/dev/loop%d cleared); start attached %s afresh", version, number, name)
		return
	}
	// systemd >= 254: the inactive unit keeps the store, PID 1 the device.
	if state := svc.show("ActiveState"); state != "inactive" {
		t.Fatalf("after stop: ActiveState %s", state)
	}
	svc.wantStored(1)
	if !pid1Holds(t, sbx, number) {
		t.Errorf("%s: after stop, PID 1 holds no fd of /dev/loop%d", version, number)
	}
	if bound, seq := binding(number); !bound || seq != diskseq {
		t.Fatalf("%s: /dev/loop%d lost its binding on stop (bound %v, diskseq %d)", version, number, bound, seq)
	}
	svc.systemctl("start", "fdsvc.service")
	svc.wantReceived(svc.mainPID(), name)
	t.Logf("%s: stop kept the store (/dev/loop%d diskseq %d bound); start received %s", version, number, diskseq, name)

	// The package's removal: prerm stops the unit (and runs `systemctl clean
	// --what=fdstore`, which needs the D-Bus system bus: the sandbox has none),
	// dpkg removes the unit file, postrm's daemon-reload unloads the unit,
	// and that drops the store: the device goes.
	svc.systemctl("stop", "fdsvc.service")
	svc.wantStored(1)
	if out, err := sbx.Exec("rm", "/run/systemd/system/fdsvc.service"); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	svc.systemctl("daemon-reload")
	waitCleared(t, number, diskseq)
	if state := svc.show("LoadState"); state != "not-found" {
		t.Errorf("after the unit file went and daemon-reload: LoadState %s, want not-found", state)
	}
	svc.wantStored(0)
}
