package daemon

// Adoption of the loop devices the stock block script made. After
// `xenblkd takeover`, /etc/xen/scripts/block is ours, and so are the backends
// it attached before: their loop devices were made by `losetup` (no
// AUTOCLEAR, lo_file_name = the image path, no diskseq node), and the script
// recorded the device in the backend's node and physical-device. Such a device
// is verified (node, physical-device and the backing file by device and inode
// against params), claimed (AUTOCLEAR, our tag: loop.Claim), pushed to the
// fd store, its diskseq recorded, and restored into the model, where the
// sharing rules count it. Its remove then frees it like any of ours. A device
// that does not check out is left exactly as it is: the backend may still
// work, and wiping it would break the VM.

import (
	"context"
	"fmt"
	"strconv"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/lifecycle"
	"xenblkd/internal/loop"
	"xenblkd/internal/model"
	"xenblkd/internal/text"
)

// stockDevice is what the stock script wrote for a backend.
type stockDevice struct {
	pdev string // physical-device as written ("7:4")
	rdev uint64
	node string // /dev/loopN
}

// checkStock verifies what the stock script recorded, without touching the
// device: it returns the loop device number.
func checkStock(s stockDevice) (int, error) {
	if unix.Major(s.rdev) != loop.Major {
		return 0, fmt.Errorf("physical-device %s is not a loop device but params is a file", s.pdev)
	}
	n := int(unix.Minor(s.rdev))
	if want := "/dev/loop" + strconv.Itoa(n); s.node != want {
		return 0, fmt.Errorf("node %q does not name physical-device %s (%s)", text.Truncate(s.node, 64), s.pdev, want)
	}
	return n, nil
}

// adoptStock takes over the stock script's loop device of backend b (a is the
// attachment params and mode resolved to) and restores it. A device that does
// not check out is logged and left alone, with the backend.
func (d *Daemon) adoptStock(ctx context.Context, b hotplug.Backend, s stockDevice, a model.Attachment, run *recoveryRun) error {
	log := d.log.With("domid", b.Domid, "devid", b.Devid)
	dev, err := d.claimStock(s, a, run.held)
	if err != nil {
		run.sum.Foreign++
		log.Error("stock script's loop device does not check out; leaving it and the backend as they are "+
			"(its remove will not free it: check it, then losetup -d it once the domain is gone)",
			"node", text.Truncate(s.node, 64), "physical_device", s.pdev, "params", text.Truncate(a.Params, 200), "err", err)
		return nil
	}
	if dev.Rdev() != s.rdev {
		return fmt.Errorf("claimed %s is not physical-device %s", dev.Path(), s.pdev)
	}
	// The diskseq node makes the backend look like one of ours from now on
	// (a later restart re-opens or adopts it by diskseq).
	if err := hotplug.RecordDiskSeq(ctx, d.store, b, s.pdev, dev.DiskSeq()); err != nil {
		log.Warn("adopt: could not record diskseq; the device is held anyway", "dev", dev.Path(), "err", err)
	}
	if err := d.model.Restore(a, dev); err != nil {
		return err
	}
	run.held[s.rdev] = dev
	run.used[s.rdev] = true
	run.sum.Stock++
	run.sum.Restored++
	log.Info("adopted the stock script's loop device", "target", a.Target.Path, "mode", a.Mode, "dev", dev.Path(),
		"diskseq", dev.DiskSeq(), "autoclear", true)
	return nil
}

// claimStock checks s and claims its device (or finds it among the fd
// store's devices: claimed by an earlier run that could not record diskseq).
func (d *Daemon) claimStock(s stockDevice, a model.Attachment, held map[uint64]HeldLoop) (HeldLoop, error) {
	number, err := checkStock(s)
	if err != nil {
		return nil, err
	}
	want := a.Target.File
	if dev := held[s.rdev]; dev != nil {
		if dev.Backing() != want {
			return nil, fmt.Errorf("the fd store's %s is bound to file %d:%d, params is %d:%d",
				dev.Path(), dev.Backing().Dev, dev.Backing().Ino, want.Dev, want.Ino)
		}
		return dev, nil
	}
	dev, err := d.loops.Claim(number, want)
	if err != nil {
		return nil, err
	}
	if a.Mode.Writable && dev.ReadOnly() {
		// Claimed already (AUTOCLEAR is set), so keep holding it for the VM.
		d.log.Warn("stock script's loop device is read-only but mode is w", "dev", dev.Path())
	}
	return dev, nil
}

// AdoptStock takes over, while the daemon runs, the stock script's devices of
// every backend that is ours (by Scripts) and not attached yet: what
// `xenblkd takeover` asks for once /etc/xen/scripts/block is ours. Backends
// that are attached, or have no physical-device, are left alone.
//
// Each XenStore listing and each backend is bounded by api.RequestTimeout,
// as an exec'd add is (an add of the same backend waits for its lock), and
// the whole by nothing: it takes as long as the host has backends.
func (d *Daemon) AdoptStock(ctx context.Context) (RecoverySummary, error) {
	var sum RecoverySummary
	d.recovering.Lock()
	defer d.recovering.Unlock()
	lctx, cancel := context.WithTimeout(ctx, api.RequestTimeout)
	backends, err := hotplug.ListBackends(lctx, d.store)
	cancel()
	if err != nil {
		return sum, err
	}
	d.run = &recoveryRun{held: map[uint64]HeldLoop{}, used: map[uint64]bool{}, sum: &sum}
	defer func() { d.run = nil }()
	for _, b := range backends {
		bctx, cancel := context.WithTimeout(ctx, api.RequestTimeout)
		_, err := d.step(bctx, b, lifecycle.FromRecovery) // act.go
		cancel()
		if err != nil {
			d.log.Error("adopt: backend not taken over", "domid", b.Domid, "devid", b.Devid, "err", err)
		}
	}
	d.log.Info("adoption done", "stock", sum.Stock, "restored", sum.Restored, "foreign", sum.Foreign, "mismatched", sum.Mismatched)
	return sum, nil
}

// releaseStock frees, on remove, the stock script's device of a backend we
// do not hold (it was attached before the takeover and not adopted yet, e.g.
// the daemon was down): claimed (AUTOCLEAR) and closed, the kernel frees it
// once blkback has let go, as `losetup -d $node` in the stock remove would.
// s has the backend's physical-device, node and params (decideRemove).
func (d *Daemon) releaseStock(s hotplug.Snapshot) error {
	pdev := s.Value(hotplug.PhysicalDevice)
	rdev, err := hotplug.ParseRdev(pdev)
	if err != nil {
		return err
	}
	backing, target, err := openTarget(s.Value(hotplug.Params), false)
	if err != nil {
		return err
	}
	backing.Close()
	if target.Kind != model.RegularFile {
		return nil // a phy: disk has nothing to free
	}
	dev, err := d.claimStock(stockDevice{pdev: pdev, rdev: rdev, node: s.Value(hotplug.StockNode)}, model.Attachment{Target: target}, nil)
	if err != nil {
		return err
	}
	d.log.Info("remove: released the stock script's loop device", "domid", s.Backend.Domid, "devid", s.Backend.Devid,
		"dev", dev.Path(), "diskseq", dev.DiskSeq())
	return dev.Close()
}
