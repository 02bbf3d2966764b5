package recovery_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/loop"
	"xenblkd/test/looptest"
)

// TestScriptsFlagSurvivesRestart is issue 12's bug: with --scripts
// xenblkd-block, pre-setup and the exec'd add attach a backend whose script
// is /etc/xen/scripts/xenblkd-block, and after a restart recovery must
// recognise it as ours too (it used to compare the whole path with the
// entry, not recognise it, and let its device go).
func TestScriptsFlagSurvivesRestart(t *testing.T) {
	d := startProc(t, "--scripts", "xenblkd-block")
	dir := privateDir(t, "xb-rec-img-")
	k := key{domid: 60, devid: 51712}
	setupBackend(t, k, makeImage(t, dir, "scripts.img"), "w", "/etc/xen/scripts/xenblkd-block")
	t.Cleanup(func() { rmBackend(k) })
	mustHotplug(t, d, "add", k)
	a, err := readAttached(t, k)
	if err != nil {
		t.Fatal(err)
	}
	if err := hold(t, &a); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.release)
	before := statusOf(t, d)
	if _, ok := before[k]; !ok {
		t.Fatalf("%s not attached before the restart: %v", k.be(), before)
	}
	d.Kill9(t)
	if got := statusOf(t, d)[k]; got != before[k] {
		t.Fatalf("after kill -9 and restart %s is %+v, was %+v (recovery did not recognise --scripts xenblkd-block)", k.be(), got, before[k])
	}
	if msg, ok := readNode(t, k.be()+"/hotplug-error"); ok {
		t.Fatalf("hotplug-error after restart: %s", msg)
	}
	mustHotplug(t, d, "remove", k)
	a.release()
	waitNoneTagged(t)
}

// stockDisk is a backend the stock block script attached: a losetup device
// (no AUTOCLEAR, lo_file_name = the path), node, physical-device,
// physical-device-path and hotplug-status written as its add writes them,
// state 4 as once blkback connected, and the stand-in holding the device.
type stockDisk struct {
	k       key
	params  string
	dev     string // /dev/loopN
	a       attached
	diskseq uint64 // the device's, from sysfs (XenStore has none)
}

func stockAttach(t *testing.T, k key, params, mode, script string) *stockDisk {
	t.Helper()
	var args []string
	if mode == "r" {
		args = []string{"-r"}
	}
	dev := looptest.Losetup(t, params, args...)
	s := &stockDisk{k: k, params: params, dev: dev.Path, diskseq: dev.DiskSeq}
	s.a = attached{rdev: dev.Rdev, vm: -1}
	setupBackend(t, k, params, mode, script)
	t.Cleanup(func() { rmBackend(k) })
	pd := fmt.Sprintf("%x:%x", unix.Major(dev.Rdev), unix.Minor(dev.Rdev))
	for _, n := range [][2]string{{"node", s.dev}, {"physical-device", pd}, {"physical-device-path", s.dev}, {"hotplug-status", "connected"}, {"state", "4"}} {
		if err := xs.Write(context.Background(), abs(k.be()+"/"+n[0]), n[1]); err != nil {
			t.Fatal(err)
		}
	}
	if err := hold(t, &s.a); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.a.release)
	return s
}

// binding returns the current binding of the loop device rdev (ok false if unbound).
func binding(t *testing.T, rdev uint64) (loop.Binding, bool) {
	t.Helper()
	return bindingOf(t, int(unix.Minor(rdev)))
}

// waitFreed waits until the device of s is no longer bound with its diskseq.
func waitFreed(t *testing.T, what string, rdev, diskseq uint64) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, ok := binding(t, rdev)
		if !ok || b.DiskSeq != diskseq {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s still bound (diskseq %d) 30 s after its last user let go: leaked", what, b.Path, diskseq)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func waitDetached(t *testing.T, d daemonCtl, k key) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, ok := statusOf(t, d)[k]; !ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still attached 30 s after its backend directory went", k.be())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestTakeoverAdoptsStockDevices: guests attached by the stock script, then
// /etc/xen/scripts/block becomes ours (a link to the entry, as `xenblkd
// takeover` makes it; here in a private scripts directory, named to the
// daemon by --hotplug-entry). The daemon recognises block by device and
// inode, adopts what checks out (AUTOCLEAR, our tag, diskseq recorded),
// leaves alone what does not (no physical-device removed, no hotplug-error),
// counts the adopted disks in the sharing rules, keeps them across a crash,
// and frees them on remove. After the undo, a disk xenblkd attached under
// block is released when its backend directory goes (libxl ran the stock
// remove, which has nothing to free for it).
func TestTakeoverAdoptsStockDevices(t *testing.T) {
	scripts := privateDir(t, "xb-rec-scripts-")
	entry, block := filepath.Join(scripts, "xenblkd"), filepath.Join(scripts, "block")
	if err := os.Symlink(binary, entry); err != nil {
		t.Fatal(err)
	}
	d := startProc(t, "--hotplug-entry", entry)
	dir := privateDir(t, "xb-rec-img-")

	rw := stockAttach(t, key{domid: 70, devid: 51712}, makeImage(t, dir, "rw.img"), "w", block)
	ro := stockAttach(t, key{domid: 71, devid: 51712}, makeImage(t, dir, "ro.img"), "r", block)
	bad := stockAttach(t, key{domid: 72, devid: 51712}, makeImage(t, dir, "bad.img"), "w", block)
	xs.Write(context.Background(), abs(bad.k.be()+"/node"), "/dev/loop999999") // not what physical-device names
	late := stockAttach(t, key{domid: 73, devid: 51712}, makeImage(t, dir, "late.img"), "w", block)

	// Before the takeover block is not ours: nothing is touched.
	if st := statusOf(t, d); len(st) != 0 {
		t.Fatalf("attachments before the takeover: %v", st)
	}

	if err := os.Symlink(binary, block); err != nil { // the takeover
		t.Fatal(err)
	}
	// A remove before the daemon adopted it frees the stock device as the
	// stock remove's losetup -d would (once blkback let go).
	mustHotplug(t, d, "remove", late.k)
	if _, ok := readNode(t, late.k.be()+"/physical-device"); ok {
		t.Error("physical-device left after remove")
	}
	late.a.release()
	waitFreed(t, "remove of a stock disk not adopted yet", late.a.rdev, late.diskseq)

	resp, err := api.Call(context.Background(), d.Socket(), api.Request{Op: api.OpAdopt})
	if err != nil || !resp.OK {
		t.Fatalf("adopt: %v %s", err, resp.Error)
	}
	t.Logf("adopt: %s", resp.Summary)
	st := statusOf(t, d)
	for _, s := range []*stockDisk{rw, ro} {
		got, ok := st[s.k]
		if !ok || got.device != s.dev || got.diskseq != s.diskseq {
			t.Errorf("%s after adoption: %+v (attached %v), want %s diskseq %d", s.k.be(), got, ok, s.dev, s.diskseq)
		}
		if seq, _ := readNode(t, s.k.be()+"/diskseq"); seq != strconv.FormatUint(s.diskseq, 16) {
			t.Errorf("%s/diskseq = %q, want %x", s.k.be(), seq, s.diskseq)
		}
		b, _ := binding(t, s.a.rdev)
		if b.Flags&unix.LO_FLAGS_AUTOCLEAR == 0 || !strings.HasPrefix(b.Tag, tag) || b.DiskSeq != s.diskseq {
			t.Errorf("%s after adoption: flags %#x tag %q diskseq %d, want AUTOCLEAR, tag %s, diskseq %d", s.dev, b.Flags, b.Tag, b.DiskSeq, tag, s.diskseq)
		}
	}
	if _, ok := st[bad.k]; ok {
		t.Errorf("%s (node does not match physical-device) was adopted", bad.k.be())
	}
	for _, s := range []*stockDisk{rw, ro, bad} {
		if _, ok := readNode(t, s.k.be()+"/physical-device"); !ok {
			t.Errorf("%s: physical-device removed from a backend that still works", s.k.be())
		}
		if msg, ok := readNode(t, s.k.be()+"/hotplug-error"); ok {
			t.Errorf("%s: hotplug-error written: %s", s.k.be(), msg)
		}
	}
	if b, _ := binding(t, bad.a.rdev); b.Flags&unix.LO_FLAGS_AUTOCLEAR != 0 || b.Tag != bad.params {
		t.Errorf("the device that did not check out was changed: flags %#x tag %q", b.Flags, b.Tag)
	}

	// Sharing: the adopted read-write image is refused to another domain,
	// read-write and read-only.
	for i, mode := range []string{"w", "r"} {
		k := key{domid: 74 + i, devid: 51712}
		setupBackend(t, k, rw.params, mode, block)
		t.Cleanup(func() { rmBackend(k) })
		out, code := hotplug(t, d, "add", k)
		if code == 0 || !strings.Contains(out, "domain 70 device 51712") {
			t.Errorf("mode %s request for the adopted rw image: exit %d: %s; want a refusal naming domain 70", mode, code, out)
		}
		hotplug(t, d, "remove", k)
		rmBackend(k)
	}

	// A crash: the adopted disks come back like any of ours (by diskseq).
	before := statusOf(t, d)
	d.Kill9(t)
	if after := statusOf(t, d); after[rw.k] != before[rw.k] || after[ro.k] != before[ro.k] {
		t.Errorf("after kill -9 and restart: %v, was %v", after, before)
	}

	// The adopted read-only disk's remove frees it once blkback lets go.
	mustHotplug(t, d, "remove", ro.k)
	ro.a.release()
	waitFreed(t, "remove of an adopted disk", ro.a.rdev, ro.diskseq)

	// A disk attached by xenblkd under the taken-over block.
	u := key{domid: 76, devid: 51712}
	setupBackend(t, u, makeImage(t, dir, "undo.img"), "w", block)
	t.Cleanup(func() { rmBackend(u) })
	mustHotplug(t, d, "add", u)
	ua, err := readAttached(t, u)
	if err != nil {
		t.Fatal(err)
	}
	if err := hold(t, &ua); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ua.release)

	// The undo. Then libxl runs the stock remove: for the adopted disk it
	// does losetup -d $node (which only marks it AUTOCLEAR, it is open), for
	// ours it fails (no node); then it removes the backend directory.
	if err := os.Remove(block); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("losetup", "-d", rw.dev).CombinedOutput(); err != nil {
		t.Fatalf("losetup -d %s: %v: %s", rw.dev, err, out)
	}
	rmBackend(rw.k)
	rmBackend(u)
	waitDetached(t, d, rw.k)
	waitDetached(t, d, u)
	rw.a.release()
	ua.release()
	waitFreed(t, "adopted disk after the undo", rw.a.rdev, rw.diskseq)
	waitFreed(t, "xenblkd's disk after the undo", ua.rdev, ua.diskseq)
	waitNoneTagged(t)
	if log := d.Log(); !strings.Contains(log, "adopted the stock script's loop device") || !strings.Contains(log, "does not check out") {
		t.Errorf("the daemon log lacks the adoption lines:\n%s", tail(log, 30))
	}
}

// TestRecoveryAdoptsStockDevicesAtStart: the daemon starts after the
// takeover (a host switched over with the daemon down, or rebooted into it):
// recovery adopts the stock script's devices before it serves.
func TestRecoveryAdoptsStockDevicesAtStart(t *testing.T) {
	scripts := privateDir(t, "xb-rec-scripts-")
	entry, block := filepath.Join(scripts, "xenblkd"), filepath.Join(scripts, "block")
	for _, p := range []string{entry, block} {
		if err := os.Symlink(binary, p); err != nil {
			t.Fatal(err)
		}
	}
	dir := privateDir(t, "xb-rec-img-")
	s := stockAttach(t, key{domid: 80, devid: 51712}, makeImage(t, dir, "start.img"), "w", block)
	d := startProc(t, "--hotplug-entry", entry)
	if got := statusOf(t, d)[s.k]; got.device != s.dev || got.diskseq != s.diskseq {
		t.Fatalf("after start: %+v, want %s diskseq %d", got, s.dev, s.diskseq)
	}
	if !strings.Contains(d.Log(), "stock=1") {
		t.Errorf("recovery summary does not count the stock device:\n%s", tail(d.Log(), 10))
	}
	mustHotplug(t, d, "remove", s.k)
	s.a.release()
	waitFreed(t, "adopted at start, then removed", s.a.rdev, s.diskseq)
	waitNoneTagged(t)
}
