package recovery_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
)

// disk is one backend of a scenario.
type disk struct {
	k      key
	params string
	mode   string
	hold   bool // the blkback stand-in opens it
}

// disks makes n backends: 2/5 read-write images (one each), 2/5 read-only
// images shared by many backends (3 images), 1/5 phy (a losetup device each,
// read-write). Loop-backed disks are held by the stand-in if holdAll, else
// every other one.
func disks(t *testing.T, dir string, n int, holdAll bool) []disk {
	t.Helper()
	shared := []string{makeImage(t, dir, "ro0.img"), makeImage(t, dir, "ro1.img"), makeImage(t, dir, "ro2.img")}
	var out []disk
	for i := 0; i < n; i++ {
		d := disk{k: key{domid: 1 + i%17, devid: 51712 + i}, hold: holdAll || i%2 == 0}
		switch i % 5 {
		case 0, 1:
			d.params, d.mode = makeImage(t, dir, fmt.Sprintf("rw%d.img", i)), "w"
		case 2, 3:
			d.params, d.mode = shared[i%3], "r"
		case 4:
			d.params, d.mode, d.hold = losetup(t, makeImage(t, dir, fmt.Sprintf("phy%d.img", i))), "w", false
		}
		out = append(out, d)
	}
	return out
}

// attachAll adds every disk and returns what each completed add left.
func attachAll(t *testing.T, d daemonCtl, ds []disk) map[key]*attached {
	t.Helper()
	want := map[key]*attached{}
	for _, dk := range ds {
		setupBackend(t, dk.k, dk.params, dk.mode, "/etc/xen/scripts/xenblkd")
		t.Cleanup(func() { rmBackend(dk.k) })
		mustHotplug(t, d, "add", dk.k)
		a, err := readAttached(t, dk.k)
		if err != nil {
			t.Fatal(err)
		}
		if dk.hold {
			if err := hold(t, &a); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(a.release)
		}
		want[dk.k] = &a
	}
	return want
}

type statusKey struct {
	device  string
	diskseq uint64
	users   int
}

func statusOf(t *testing.T, d daemonCtl) map[key]statusKey {
	t.Helper()
	resp, err := api.Call(context.Background(), d.Socket(), api.Request{Op: api.OpStatus})
	if err != nil || !resp.OK {
		t.Fatalf("status: %v %s", err, resp.Error)
	}
	out := map[key]statusKey{}
	for _, a := range resp.Attachments {
		out[key{int(a.Domid), int(a.Devid)}] = statusKey{a.Device, a.DiskSeq, a.Users}
	}
	return out
}

// distinctLoops counts the loop devices the attachments use.
func distinctLoops(want map[key]*attached) int {
	seen := map[uint64]bool{}
	for _, a := range want {
		if a.diskseq != 0 {
			seen[a.rdev] = true
		}
	}
	return len(seen)
}

// expectRecovered checks that after event every attachment is back as it was.
func expectRecovered(t *testing.T, d daemonCtl, event string, want map[key]*attached, before map[key]statusKey) {
	t.Helper()
	c, why := settle(t, d, want)
	t.Logf("after %s: %s", event, c)
	fmt.Fprintf(os.Stderr, "%s after %s: %s\n", t.Name(), event, c)
	if !c.ok() {
		t.Errorf("after %s: %s\n%s", event, c, strings.Join(why, "\n"))
	}
	if got, wantN := c.Tagged, distinctLoops(want); got != wantN {
		t.Errorf("after %s: %d tagged loop devices bound, want %d (one per distinct attached device)", event, got, wantN)
	}
	after := statusOf(t, d)
	for k, b := range before {
		if a := after[k]; a != b {
			t.Errorf("after %s: %s is %+v, was %+v", event, k.be(), a, b)
		}
	}
	for k, a := range after {
		if _, ok := before[k]; !ok {
			t.Errorf("after %s: unexpected attachment %s: %+v", event, k.be(), a)
		}
	}
}

// detachAll removes every disk, then the stand-in lets go: nothing may stay.
func detachAll(t *testing.T, d daemonCtl, want map[key]*attached) {
	t.Helper()
	for k, a := range want {
		mustHotplug(t, d, "remove", k)
		if _, ok := readNode(t, k.be()+"/physical-device"); ok {
			t.Errorf("%s: physical-device left after remove", k.be())
		}
		a.release()
	}
	waitNoneTagged(t)
	if n := len(statusOf(t, d)); n != 0 {
		t.Errorf("%d attachments left after removing every disk", n)
	}
}

// TestRecoveryWithoutSystemd: a plain subprocess daemon, no fd store. The
// stand-in holds every loop device (as blkback does once the VM runs); after
// kill -9 and a restart by hand the daemon rebuilds every attachment from
// XenStore, re-opening each device by number and diskseq. A disk nobody held
// is gone after the crash: it must be reported, its physical-device removed.
func TestRecoveryWithoutSystemd(t *testing.T) {
	d := startProc(t)
	dir := privateDir(t, "xb-rec-img-")
	ds := disks(t, dir, 20, true)
	want := attachAll(t, d, ds)

	// Another script's backend, physical-device set: not ours, never touched.
	foreign := key{domid: 40, devid: 51712}
	setupBackend(t, foreign, "/dev/null", "w", "/etc/xen/scripts/block")
	t.Cleanup(func() { rmBackend(foreign) })
	xs.Write(context.Background(), abs(foreign.be()+"/physical-device"), "1:3")
	// A disk the stand-in never opened: without the fd store it dies with the daemon.
	idle := key{domid: 41, devid: 51712}
	setupBackend(t, idle, makeImage(t, dir, "idle.img"), "w", "/etc/xen/scripts/xenblkd")
	t.Cleanup(func() { rmBackend(idle) })
	mustHotplug(t, d, "add", idle)

	idleDev, err := readAttached(t, idle)
	if err != nil {
		t.Fatal(err)
	}
	before := statusOf(t, d)
	delete(before, idle)
	d.kill()
	// AUTOCLEAR runs on the last close; udev's probe of a new device may
	// still hold it for a moment (then recovery rightly finds it bound).
	waitUnbound(t, idleDev)
	d.start()

	// Recovery removed physical-device and wrote hotplug-error; the daemon's
	// pre-setup watch may attach the backend afresh at any moment after that,
	// so the idle backend is checked through the log, then taken away as
	// libxl would (backend removed, remove run), before the checks below.
	if pd, ok := readNode(t, idle.be()+"/physical-device"); ok && pd == fmt.Sprintf("%x:%x", unix.Major(idleDev.rdev), unix.Minor(idleDev.rdev)) {
		if seq, _ := readNode(t, idle.be()+"/diskseq"); seq == strconv.FormatUint(idleDev.diskseq, 16) {
			t.Errorf("%s: physical-device and diskseq still name the freed device after recovery", idle.be())
		}
	}
	if !strings.Contains(d.Log(), "gone or reused") {
		t.Error("the lost idle device was not reported in the log")
	}
	if pd, _ := readNode(t, foreign.be()+"/physical-device"); pd != "1:3" {
		t.Errorf("foreign backend's physical-device = %q, want it untouched", pd)
	}
	rmBackend(idle)
	mustHotplug(t, d, "remove", idle)
	expectRecovered(t, d, "kill -9 and restart by hand", want, before)
	detachAll(t, d, want)
}

// TestRecoveryUnderSystemd: the built binary as xenblkd.service (from
// dist/xenblkd.service) under systemd 252, 50 disks, half the loop devices
// not held by the stand-in, so only the fd store keeps them across
// restart, kill -9 (Restart=always) and daemon-reexec.
func TestRecoveryUnderSystemd(t *testing.T) {
	dir := privateDir(t, "xb-rec-img-")
	os.Chmod(dir, 0o755)
	ds := disks(t, dir, 50, false) // losetup before the sandbox: its /dev is fixed at boot
	u := startUnit(t, dir)
	want := attachAll(t, u, ds)
	before := statusOf(t, u)
	if n, wantN := u.storedFds(t), distinctLoops(want); n != wantN {
		t.Errorf("NFileDescriptorStore = %d, want %d (one per loop device)", n, wantN)
	}

	u.systemctl(t, "restart", unitName)
	waitServing(t, u.Socket(), u.alive)
	expectRecovered(t, u, "systemctl restart", want, before)

	u.Kill9(t)
	expectRecovered(t, u, "kill -9 of the main pid", want, before)

	u.systemctl(t, "daemon-reexec")
	waitServing(t, u.Socket(), u.alive)
	expectRecovered(t, u, "systemctl daemon-reexec", want, before)
	// The store must also have survived the re-exec of PID 1.
	u.Kill9(t)
	expectRecovered(t, u, "daemon-reexec, then kill -9", want, before)
	if !strings.Contains(u.Log(), "adopted=") {
		t.Error("no recovery summary in the daemon log")
	}
	if n, wantN := u.storedFds(t), distinctLoops(want); n != wantN {
		t.Errorf("NFileDescriptorStore = %d, want %d", n, wantN)
	}

	detachAll(t, u, want)
	if n := u.storedFds(t); n != 0 {
		t.Errorf("NFileDescriptorStore = %d after every remove, want 0", n)
	}
}

// waitUnbound waits until the device no longer carries a's binding.
func waitUnbound(t *testing.T, a attached) {
	t.Helper()
	sys := fmt.Sprintf("/sys/dev/block/%d:%d/diskseq", unix.Major(a.rdev), unix.Minor(a.rdev))
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, err := os.ReadFile(sys)
		if err != nil || strings.TrimSpace(string(b)) != strconv.FormatUint(a.diskseq, 10) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the idle device is still bound 30 s after the daemon died", sys)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
