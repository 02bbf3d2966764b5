package main_test

// End-to-end tests of the disk cases Xen 4.19 and 4.20 added, driven as libxl
// drives them: an empty CD-ROM drive (a 0-byte placeholder as params), the
// cd-insert / cd-eject of a guest with a stub domain (4.20: the stub domain's
// vbd is removed and added again with the new target), and backendtype=tap
// (backend/vbd3 and the block-tap script), which is not xenblkd's.

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/test/libxl"
)

// emptyCDROM makes the placeholder libxl 4.19+ creates for an empty drive of
// guest domid: a 0-byte file, mode 0400 (creat(2)). libxl's lives in
// /var/run/xen (libxl.EmptyCDROM); the test's in its own directory, under the
// same name.
func emptyCDROM(t *testing.T, domid int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), filepath.Base(libxl.EmptyCDROM(domid)))
	if err := os.WriteFile(path, nil, 0o400); err != nil {
		t.Fatal(err)
	}
	images.Store(path, true)
	return path
}

// cdromAdd writes a CD-ROM drive's nodes as libxl does (mode r: xl's default
// access for devtype=cdrom), then state 2 as blkback's probe does, and execs
// the script's add.
func cdromAdd(t *testing.T, d *daemon, domid, devid int, params string) libxl.Disk {
	t.Helper()
	ctx := context.Background()
	disk := libxl.Disk{Domid: domid, Devid: devid, Params: params, Mode: "r", Script: "/etc/xen/scripts/xenblkd", CDROM: true, Vdev: "hdc"}
	if err := libxl.Write(ctx, xs, disk); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { libxl.Remove(ctx, xs, disk) })
	if err := xs.Write(ctx, disk.BackendAbs()+"/state", "2"); err != nil {
		t.Fatal(err)
	}
	mustHotplug(t, d, "add", disk.Backend())
	if got, _ := read(t, disk.Backend()+"/hotplug-status"); got != "connected" {
		t.Fatalf("hotplug-status = %q, want connected", got)
	}
	return disk
}

// cdromRemove is libxl's removal of the drive: blkback lets go of the device
// (the stand-in closes), the script's remove, then the nodes go.
func cdromRemove(t *testing.T, d *daemon, disk libxl.Disk, vm *os.File) {
	t.Helper()
	vm.Close()
	mustHotplug(t, d, "remove", disk.Backend())
	libxl.Remove(context.Background(), xs, disk)
}

// waitFreed waits until loop device rdev is no longer bound with diskseq seq.
func waitFreed(t *testing.T, what string, rdev, seq uint64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for bound(rdev, seq) {
		if time.Now().After(deadline) {
			t.Fatalf("%s (%d:%d, diskseq %d) still bound 5 s after its remove", what, unix.Major(rdev), unix.Minor(rdev), seq)
		}
		time.Sleep(time.Millisecond)
	}
}

func deviceSize(t *testing.T, f *os.File) uint64 {
	t.Helper()
	size, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		t.Fatal(err)
	}
	return size
}

// TestEmptyCDROM: the placeholder of an empty drive is attached as the stock
// script attaches it (a read-only loop device of 0 bytes), recorded like any
// file, and freed on remove.
func TestEmptyCDROM(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	const domid = 1300
	disk := cdromAdd(t, d, domid, 5632, emptyCDROM(t, domid))
	vm, rdev := standIn(t, disk.Backend(), "", false)
	if size := deviceSize(t, vm); size != 0 {
		t.Errorf("empty drive's device has %d bytes, want 0", size)
	}
	seq := diskseqOf(t, disk.Backend())
	if ro, err := os.ReadFile(filepath.Join("/sys/dev/block", strconv.Itoa(int(unix.Major(rdev)))+":"+strconv.Itoa(int(unix.Minor(rdev))), "ro")); err != nil || strings.TrimSpace(string(ro)) != "1" {
		t.Errorf("device read-only flag %q, %v; want 1", ro, err)
	}
	cdromRemove(t, d, disk, vm)
	waitFreed(t, "the empty drive's device", rdev, seq)
}

// TestStubdomCDInsertEject: Xen 4.20's cd-insert on a guest with a stub
// domain removes the stub domain's vbd and adds it again at once with the new
// target (libxl_cdrom_insert, a18b50614d); cd-eject does the same back to a
// placeholder. Each add gives the new target; each remove frees the old
// device.
func TestStubdomCDInsertEject(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	const guest, stubdom, devid = 1310, 1311, 5632
	// The stub domain's drive gets its guest's placeholder.
	placeholder := emptyCDROM(t, guest)
	iso, sig := image(t, "install.iso")
	os.Chmod(iso, 0o444)

	disk := cdromAdd(t, d, stubdom, devid, placeholder)
	vm, rdev := standIn(t, disk.Backend(), "", false)
	seq := diskseqOf(t, disk.Backend())

	// cd-insert: remove, then add the same backend with the ISO.
	cdromRemove(t, d, disk, vm)
	disk = cdromAdd(t, d, stubdom, devid, iso)
	vm2, rdev2 := standIn(t, disk.Backend(), sig, false)
	seq2 := diskseqOf(t, disk.Backend())
	if seq2 == seq {
		t.Errorf("the inserted ISO got the placeholder's device (diskseq %d)", seq)
	}
	if got, _ := read(t, disk.Backend()+"/params"); got != iso {
		t.Errorf("params = %q, want the ISO %s", got, iso)
	}
	waitFreed(t, "the placeholder's device after cd-insert", rdev, seq)

	// cd-eject: remove, then add a fresh placeholder (libxl creat()s it again).
	cdromRemove(t, d, disk, vm2)
	disk = cdromAdd(t, d, stubdom, devid, placeholder)
	vm3, rdev3 := standIn(t, disk.Backend(), "", false)
	if size := deviceSize(t, vm3); size != 0 {
		t.Errorf("ejected drive's device has %d bytes, want 0", size)
	}
	seq3 := diskseqOf(t, disk.Backend())
	waitFreed(t, "the ISO's device after cd-eject", rdev2, seq2)

	cdromRemove(t, d, disk, vm3)
	waitFreed(t, "the placeholder's device after the last remove", rdev3, seq3)
	waitNoDevices(t)
}

// TestTapBackendLeftAlone: a backendtype=tap disk (Xen 4.19+: backend/vbd3,
// the block-tap script) is not xenblkd's: neither pre-setup's watch nor a
// daemon starting (recovery) touches it, even with an image file as params.
func TestTapBackendLeftAlone(t *testing.T) {
	ctx := context.Background()
	img, _ := image(t, "tap.img")
	tap := libxl.Disk{Domid: 1320, Devid: 51712, Params: img, Mode: "w", Script: "/etc/xen/scripts/block-tap", Kind: "vbd3"}
	if err := libxl.Write(ctx, xs, tap); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { libxl.Remove(ctx, xs, tap) })
	if err := xs.Write(ctx, tap.BackendAbs()+"/state", "2"); err != nil {
		t.Fatal(err)
	}
	// Started after the tap backend exists: recovery sees it; then pre-setup's
	// watch sees a second one appear.
	d := startDaemon(t, xsd.Socket)
	tap2 := tap
	tap2.Domid = 1321
	if err := libxl.Write(ctx, xs, tap2); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { libxl.Remove(ctx, xs, tap2) })

	// A vbd disk written after both is set up by pre-setup: the daemon has
	// handled the watch events before it (readiness, not a sleep).
	sentinel, _ := image(t, "sentinel.img")
	be := libxlWrite(t, 1322, 51712, sentinel, "w")
	waitNode(t, be+"/physical-device")
	t.Cleanup(func() { hotplug(t, d, "remove", be) })

	for _, disk := range []libxl.Disk{tap, tap2} {
		for _, n := range []string{"physical-device", "physical-device-path", "diskseq", "hotplug-status", "hotplug-error"} {
			if v, ok := read(t, disk.Backend()+"/"+n); ok {
				t.Errorf("%s/%s = %q: xenblkd touched a vbd3 backend", disk.Backend(), n, v)
			}
		}
	}
	for _, dev := range ourDevices(t) {
		b, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop/backing_file"))
		if strings.TrimSpace(string(b)) == img {
			t.Errorf("%s is bound to the tap disk's image", dev)
		}
	}
	// The script's entry refuses a vbd3 backend outright, should libxl be
	// pointed at it by mistake (script=xenblkd with backendtype=tap).
	stderr, code := hotplug(t, d, "add", tap.Backend(), "XENBUS_TYPE=vbd3")
	if code == 0 {
		t.Errorf("add of %s with XENBUS_TYPE=vbd3 succeeded", tap.Backend())
	}
	t.Logf("vbd3 add: exit %d: %s", code, strings.TrimSpace(stderr))
	if log := d.logText(); strings.Contains(log, "vbd3") {
		t.Errorf("the daemon logged about a vbd3 backend:\n%s", log)
	}
}

// TestEmptyCDROMGuestAndStubdom: libxl gives a stub domain's drive its
// guest's placeholder, so the guest's drive and the stub domain's name the
// same 0-byte file, both read-only: one loop device serves both (read-only
// images are shared), and it is freed after the last remove.
func TestEmptyCDROMGuestAndStubdom(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	const guest, stubdom, devid = 1330, 1331, 5632
	placeholder := emptyCDROM(t, guest)
	guestDisk := cdromAdd(t, d, guest, devid, placeholder)
	stubDisk := cdromAdd(t, d, stubdom, devid, placeholder)
	pd1, _ := read(t, guestDisk.Backend()+"/physical-device")
	pd2, _ := read(t, stubDisk.Backend()+"/physical-device")
	if pd1 != pd2 {
		t.Errorf("guest's drive on %s, stub domain's on %s: want one shared read-only device", pd1, pd2)
	}
	vm1, rdev := standIn(t, guestDisk.Backend(), "", false)
	vm2, _ := standIn(t, stubDisk.Backend(), "", false)
	seq := diskseqOf(t, guestDisk.Backend())
	cdromRemove(t, d, stubDisk, vm2)
	if !bound(rdev, seq) {
		t.Fatal("the shared device was freed while the guest's drive still uses it")
	}
	cdromRemove(t, d, guestDisk, vm1)
	waitFreed(t, "the shared placeholder device", rdev, seq)
}
