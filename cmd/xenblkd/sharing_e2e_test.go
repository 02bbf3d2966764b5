package main_test

// The sharing rules end to end: the real daemon, the real C xenstored (node
// permissions included) and real loop devices. docs/sharing.md has the table
// of cases these exercise.

import (
	"context"
	byteorder "encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"xenblkd/internal/testenv"
	"xenblkd/internal/xenstore"
	"xenblkd/test/libxl"
	"xenblkd/test/looptest"
)

// vbdSetupVM is vbdSetup for a domain whose vm node is vm.
func vbdSetupVM(t *testing.T, domid, devid int, params, mode, vm string) string {
	t.Helper()
	ctx := context.Background()
	disk := libxl.Disk{Domid: domid, Devid: devid, Params: params, Mode: mode, Script: "/etc/xen/scripts/xenblkd", VM: vm}
	if err := libxl.Write(ctx, xs, disk); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { libxl.Remove(ctx, xs, disk); xs.Rm(ctx, fmt.Sprintf("/local/domain/%d", domid)) })
	if err := xs.Write(ctx, disk.BackendAbs()+"/state", "2"); err != nil {
		t.Fatal(err)
	}
	return disk.Backend()
}

func write(t *testing.T, path, value string) {
	t.Helper()
	if err := xs.Write(context.Background(), path, value); err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
}

func setPerms(t *testing.T, path string, perms ...xenstore.Perm) {
	t.Helper()
	if err := xs.SetPerms(context.Background(), path, perms); err != nil {
		t.Fatalf("set-perms %s: %v", path, err)
	}
}

// refused runs add and checks that it fails with want in stderr and in
// hotplug-error, and that nothing is written for blkback.
func refused(t *testing.T, d *daemon, be, want string) {
	t.Helper()
	stderr, code := hotplug(t, d, "add", be)
	herr, _ := read(t, be+"/hotplug-error")
	if code == 0 || !strings.Contains(stderr, want) || !strings.Contains(herr, want) {
		t.Fatalf("add %s: exit %d, stderr %q, hotplug-error %q; want a refusal containing %q", be, code, stderr, herr, want)
	}
	if _, ok := read(t, be+"/physical-device"); ok {
		t.Fatal("physical-device written for a refused add")
	}
	t.Logf("refused: %s", strings.TrimSpace(stderr))
}

func TestSameVMSharing(t *testing.T) {
	// Without pre-setup: each case changes the domain's nodes after libxl's
	// transaction, which pre-setup would not wait for.
	d := startDaemon(t, xsd.Socket, "--presetup=false")
	const vmA, vmB = "/vm/aaaaaaaa-0000-0000-0000-000000000001", "/vm/bbbbbbbb-0000-0000-0000-000000000002"
	const guestOwned = "guest-owned"
	tests := []struct {
		name        string
		phy         bool
		first, then string                      // the two domains' vm nodes ("" not written, guestOwned: the second domain's own node)
		stub        bool                        // the second domain is the first one's stub domain (target node)
		stubPerms   []xenstore.Perm             // the target node's permissions (nil: the toolstack's)
		mutate      func(t *testing.T, dom int) // after setup, before the second add
		want        string                      // "" must attach, else the refusal
	}{
		{name: "same VM, rw file (migrate to localhost)", first: vmA, then: vmA},
		{name: "same VM, rw phy (migrate to localhost)", phy: true, first: vmA, then: vmA},
		{name: "different VMs", first: vmA, then: vmB, want: "domain 1101 device 51712 (xvda) already uses it read-write"},
		{name: "vm node written by the guest", first: vmA, then: guestOwned, want: "already uses it read-write"},
		{name: "vm node missing", first: vmA, then: "", want: "already uses it read-write"},
		{name: "stub domain of the guest", first: vmA, then: vmB, stub: true},
		{name: "stub domain, target node written by the stub", first: vmA, then: vmB, stub: true,
			stubPerms: []xenstore.Perm{{Domid: 1102, Access: 'n'}}, want: "already uses it read-write"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img, sig := image(t, "vm.img")
			params := img
			if tt.phy {
				params = losetup(t, img)
			}
			domA, domB := 1101, 1102
			beA := vbdSetupVM(t, domA, 51712, params, "w", tt.first)
			t.Cleanup(func() { hotplug(t, d, "remove", beA) })
			mustHotplug(t, d, "add", beA)
			vmFile, _ := standIn(t, beA, sig, true)
			defer vmFile.Close()

			vm := tt.then
			if vm == guestOwned {
				vm = vmA
			}
			beB := vbdSetupVM(t, domB, 51712, params, "w", vm)
			t.Cleanup(func() { hotplug(t, d, "remove", beB) })
			ctx := context.Background()
			switch {
			case tt.then == "":
				xs.Rm(ctx, fmt.Sprintf("/local/domain/%d/vm", domB))
			case tt.then == guestOwned:
				setPerms(t, fmt.Sprintf("/local/domain/%d/vm", domB), xenstore.Perm{Domid: uint32(domB), Access: 'n'})
			}
			if tt.stub {
				node := fmt.Sprintf("/local/domain/%d/target", domB)
				write(t, node, fmt.Sprint(domA))
				if tt.stubPerms != nil {
					setPerms(t, node, tt.stubPerms...)
				}
			}
			if tt.want != "" {
				refused(t, d, beB, tt.want)
				return
			}
			mustHotplug(t, d, "add", beB)
			other, _ := standIn(t, beB, sig, true)
			other.Close()
			pdA, _ := read(t, beA+"/physical-device")
			pdB, _ := read(t, beB+"/physical-device")
			if tt.phy && pdA != pdB {
				t.Errorf("phy: got %s and %s, want the same device", pdA, pdB)
			}
			if !tt.phy && pdA == pdB {
				t.Errorf("file rw: both domains got %s, want a device each", pdA)
			}
			// The old domain goes away (the end of a migration): its
			// device is released, the new one's stays.
			mustHotplug(t, d, "remove", beA)
		})
	}
	// The reverse stub case: the stub domain attached first.
	t.Run("guest after its stub domain", func(t *testing.T) {
		// libxl creates the guest's domain first, then its stub domain.
		img, _ := image(t, "stub.img")
		beGuest := vbdSetupVM(t, 1104, 51712, img, "w", vmA)
		t.Cleanup(func() { hotplug(t, d, "remove", beGuest) })
		beStub := vbdSetupVM(t, 1103, 51712, img, "w", vmB)
		write(t, "/local/domain/1103/target", "1104")
		t.Cleanup(func() { hotplug(t, d, "remove", beStub) })
		mustHotplug(t, d, "add", beStub)
		mustHotplug(t, d, "add", beGuest)
	})
	if !strings.Contains(logText(d), "owned by domain 1102, not the toolstack") {
		t.Errorf("daemon log does not say why a guest-owned node was ignored")
	}
}

func TestLoopDeviceJudgedByItsFile(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	t.Run("phy: our rw device for another domain", func(t *testing.T) {
		img, _ := image(t, "ours-rw.img")
		be := vbdSetup(t, 1201, 51712, img, "w")
		t.Cleanup(func() { hotplug(t, d, "remove", be) })
		mustHotplug(t, d, "add", be)
		dev, _ := read(t, be+"/physical-device-path")
		for i, mode := range []string{"w", "r"} {
			be2 := vbdSetup(t, 1202+i, 51712, dev, mode)
			refused(t, d, be2, "domain 1201 device 51712 (xvda) already uses the file "+img+" (bound to this loop device) read-write")
		}
	})
	t.Run("phy: our shared read-only device", func(t *testing.T) {
		img, sig := image(t, "ours-ro.img")
		be := vbdSetup(t, 1211, 51712, img, "r")
		t.Cleanup(func() { hotplug(t, d, "remove", be) })
		mustHotplug(t, d, "add", be)
		dev, _ := read(t, be+"/physical-device-path")
		refused(t, d, vbdSetup(t, 1212, 51712, dev, "w"), "already uses the file "+img+" (bound to this loop device) read-only")
		be3 := vbdSetup(t, 1213, 51712, dev, "r")
		t.Cleanup(func() { hotplug(t, d, "remove", be3) })
		mustHotplug(t, d, "add", be3)
		standIn(t, be3, sig, false)
	})
	t.Run("phy: someone's loop device on a file we have rw", func(t *testing.T) {
		img, _ := image(t, "theirs.img")
		be := vbdSetup(t, 1221, 51712, img, "w")
		t.Cleanup(func() { hotplug(t, d, "remove", be) })
		mustHotplug(t, d, "add", be)
		foreign := losetup(t, img)
		refused(t, d, vbdSetup(t, 1222, 51712, foreign, "w"), "already uses the file "+img+" (bound to this loop device) read-write")
	})
	t.Run("file whose foreign loop device a guest has by phy:", func(t *testing.T) {
		img, _ := image(t, "phyfirst.img")
		foreign := losetup(t, img)
		be := vbdSetup(t, 1231, 51712, foreign, "w")
		t.Cleanup(func() { hotplug(t, d, "remove", be) })
		mustHotplug(t, d, "add", be)
		refused(t, d, vbdSetup(t, 1232, 51712, img, "r"), "already uses loop device "+foreign+" (bound to this file) read-write")
		second := losetup(t, img)
		refused(t, d, vbdSetup(t, 1233, 51712, second, "w"), "already uses loop device "+foreign+" (bound to the same file) read-write")
	})
}

// mbrImage makes an image with an MBR partition table: one partition from
// sector 2048, 2048 sectors long.
func mbrImage(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "parted.img")
	b := make([]byte, 4<<20)
	entry := b[446:462]
	entry[4] = 0x83 // Linux
	byteorder.LittleEndian.PutUint32(entry[8:], 2048)
	byteorder.LittleEndian.PutUint32(entry[12:], 2048)
	b[510], b[511] = 0x55, 0xaa
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	images.Store(path, true)
	return path
}

// firstPartition returns the node of whole's first partition (whole bound
// with -P). The kernel reads the partition table inside LOOP_CONFIGURE, and
// devtmpfs makes the node before the ioctl returns, so it is there when
// losetup is done, or never: a kernel built without the MS-DOS partition
// parser (CONFIG_MSDOS_PARTITION off, as on the project's VM) finds none.
// Then partx reads the table in user space and adds the partition with
// BLKPG: the same partition device, made by the kernel all the same.
func firstPartition(t *testing.T, whole string) string {
	t.Helper()
	part := whole + "p1"
	isDevice := func() bool {
		fi, err := os.Stat(part)
		return err == nil && fi.Mode()&os.ModeDevice != 0
	}
	if isDevice() {
		return part
	}
	if out, err := exec.Command("partx", "--update", whole).CombinedOutput(); err != nil {
		testenv.Skipf(t, "the kernel found no partition on %s, and partx could not add it: %v: %s", whole, err, out)
	}
	if !isDevice() {
		t.Fatalf("partx --update %s added no %s", whole, part)
	}
	return part
}

func TestPartitionsAndWholeDisk(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	whole := losetup(t, mbrImage(t), "-P")
	part := firstPartition(t, whole)
	be := vbdSetup(t, 1301, 51712, whole, "w")
	t.Cleanup(func() { hotplug(t, d, "remove", be) })
	mustHotplug(t, d, "add", be)
	refused(t, d, vbdSetup(t, 1302, 51712, part, "w"), "already uses its whole disk "+whole+" read-write")
	mustHotplug(t, d, "remove", be)

	be = vbdSetup(t, 1303, 51713, part, "w")
	t.Cleanup(func() { hotplug(t, d, "remove", be) })
	mustHotplug(t, d, "add", be)
	refused(t, d, vbdSetup(t, 1304, 51712, whole, "r"), "domain 1303 device 51713 (xvda1) already uses its partition "+part+" read-write")
}

func TestRefusedTargets(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	img, _ := image(t, "escape.img")
	rel := "../" + strings.TrimPrefix(img, "/")

	// A deleted image still open here, reached through /proc/<pid>/fd/<n>.
	gone, _ := image(t, "deleted.img")
	f, err := os.OpenFile(gone, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	os.Remove(gone)
	viaProc := fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), f.Fd())

	// A loop device nothing is bound to, held O_EXCL so no one binds it meanwhile.
	_, unbound, _ := looptest.HoldFree(t)

	before := ourDevices(t)
	tests := []struct {
		name, params, mode, want string
	}{
		{"relative params with ..", rel, "w", `a relative params names a node under /dev and may not contain ".."`},
		{"relative params with .. read-only", "loop0/../../" + strings.TrimPrefix(img, "/"), "r", `may not contain ".."`},
		{"deleted file", viaProc, "w", "the file has been deleted"},
		{"deleted file read-only", viaProc, "r", "the file has been deleted"},
		{"unbound loop device", unbound, "r", "loop device " + unbound + " has no file bound to it"},
		{"unbound loop device, relative", strings.TrimPrefix(unbound, "/dev/"), "r", "has no file bound to it"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			refused(t, d, vbdSetup(t, 1401+i, 51712, tt.params, tt.mode), tt.want)
		})
	}
	if after := ourDevices(t); len(after) != len(before) {
		t.Errorf("loop devices before %v, after %v", before, after)
	}
	// Each refusal is logged once (pre-setup met it first; the exec'd add
	// reports it without logging it again).
	if n := strings.Count(logText(d), "level=WARN msg=refused "); n != len(tests) {
		t.Errorf("daemon log has %d refusals, want %d (one each):\n%s", n, len(tests), logText(d))
	}
}

// logText is the daemon's log so far (it may still be writing).
func logText(d *daemon) string {
	d.logw.mu.Lock()
	defer d.logw.mu.Unlock()
	return d.log.String()
}

// With pre-setup (the default) the receiver of a migration is attached as
// soon as libxl's transaction (the domain's vm node with its backends) commits.
func TestSameVMSharingPresetup(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	const vm = "/vm/cccccccc-0000-0000-0000-000000000003"
	img, sig := image(t, "migrate.img")
	beOld := vbdSetupVM(t, 1151, 51712, img, "w", vm)
	t.Cleanup(func() { hotplug(t, d, "remove", beOld) })
	mustHotplug(t, d, "add", beOld)
	vmOld, _ := standIn(t, beOld, sig, true)
	vmOld.Close()
	beNew := vbdSetupVM(t, 1152, 51712, img, "w", vm)
	t.Cleanup(func() { hotplug(t, d, "remove", beNew) })
	// Pre-setup attaches the receiver before its script runs, if it is let:
	// the exec'd add, called at once, could win the race under load (and
	// then attach it itself, as it must). The wait is for what is asserted.
	attached := regexp.MustCompile(`msg=attached .* domid=1152 .* by=presetup `)
	waitUntil(t, "the receiver attached by pre-setup", func() bool { return attached.MatchString(logText(d)) })
	mustHotplug(t, d, "add", beNew)
	standIn(t, beNew, sig, true)
	mustHotplug(t, d, "remove", beOld)
}
