package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/fdstore"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/lifecycle"
	"xenblkd/internal/loop"
	"xenblkd/internal/model"
	"xenblkd/internal/text"
)

// storedDevice is a loop device whose fd is also in systemd's fd store under
// name, so that a crash of the daemon does not free it. Close takes it out of
// the store before closing our own copy: the device is freed only once both
// copies (and blkback's) are gone.
type storedDevice struct {
	*loop.Device
	name string
}

// Backing is the bound file (HeldLoop).
func (d *storedDevice) Backing() model.FileID {
	b := d.Device.Backing()
	return model.FileID{Dev: b.Dev, Ino: b.Ino}
}

func (d *storedDevice) Close() error {
	if d.name == "" { // never stored (stock.go)
		return d.Device.Close()
	}
	if err := fdstore.Remove(d.name); err != nil {
		// Our copy is still closed: a stale store entry is dropped (unverified
		// names never match) on the next start.
		err = fmt.Errorf("remove %s from the fd store: %w", d.name, err)
		return errors.Join(err, d.Device.Close())
	}
	return d.Device.Close()
}

// storeLoop pushes a freshly made device into the fd store. It runs before
// physical-device is written, so there is no moment at which XenStore names a
// device that a crash of the daemon would free. Without systemd it is a no-op.
func storeLoop(dev *loop.Device) (*storedDevice, error) {
	name := fdstore.LoopName(dev.Number(), dev.DiskSeq())
	if err := fdstore.Store(name, dev.Fd()); err != nil {
		return nil, fmt.Errorf("push %s (%s) to the systemd fd store: %w", dev.Path(), name, err)
	}
	return &storedDevice{Device: dev, name: name}, nil
}

// RecoverOptions say which backends are ours.
type RecoverOptions struct {
	// Tag is the lo_file_name prefix of our devices (api.DefaultTag if empty).
	// Fds from the store whose device carries another tag are not adopted.
	Tag string
	// Stored are the fds the service manager passed back from the fd store
	// (fdstore.Listen, without the API socket of socket activation).
	Stored []fdstore.File
}

// RecoverySummary counts what Recover did.
type RecoverySummary struct {
	Adopted    int // fds returned by the fd store, verified and taken over
	Reopened   int // loop devices re-opened by number and diskseq (no stored fd)
	Restored   int // attachments rebuilt (loop and block devices)
	Closed     int // adopted or re-opened devices no backend uses: released
	Rejected   int // stored fds that failed verification: closed
	Mismatched int // backends whose physical-device names a device gone or reused
	Stock      int // loop devices the stock block script made, verified and taken over (stock.go)
	Foreign    int // backends whose stock loop device did not check out: left alone
}

func (s RecoverySummary) String() string {
	return fmt.Sprintf("adopted %d, reopened %d, restored %d, closed %d, rejected %d, mismatched %d, stock %d, foreign %d",
		s.Adopted, s.Reopened, s.Restored, s.Closed, s.Rejected, s.Mismatched, s.Stock, s.Foreign)
}

// recoveryRun is one recovery in progress (Recover, AdoptStock).
type recoveryRun struct {
	held map[uint64]HeldLoop // adopted, re-opened or claimed loop devices, by rdev
	used map[uint64]bool     // those a backend uses, by rdev
	sum  *RecoverySummary
}

// Recover rebuilds the daemon's attachments after a restart or crash. Call it
// once, before Serve. In order:
//
//  1. the fds systemd's fd store hands back (opts.Stored) are adopted, each
//     only if it is a bound loop device whose number and diskseq are the ones
//     its name records and whose tag is ours; anything else is closed and
//     removed from the store;
//  2. every backend under backend/vbd whose script is ours and whose
//     physical-device is set is restored into the model: a loop device from
//     the adopted fds, else re-opened by number if its diskseq still is the
//     recorded one (no systemd, or the store was dropped by `systemctl stop`
//     on systemd < 254), checked against the file params names; a block
//     device from params;
//  3. every adopted device no backend uses is closed and removed from the store.
//
// A backend whose loop device is gone or reused (diskseq differs, unbound,
// other backing file) cannot be used safely by its VM: it is logged as an
// error, the device is left alone, and physical-device and diskseq are
// removed with hotplug-error explaining why, so that blkback, if it has not
// opened the device yet, never opens whatever now has that number.
func (d *Daemon) Recover(ctx context.Context, opts RecoverOptions) (RecoverySummary, error) {
	var sum RecoverySummary
	if opts.Tag == "" {
		opts.Tag = api.DefaultTag
	}
	d.recovering.Lock()
	defer d.recovering.Unlock()
	run := &recoveryRun{held: d.adoptStored(opts.Stored, opts.Tag, &sum), used: map[uint64]bool{}, sum: &sum}
	d.run = run
	defer func() { d.run = nil }()
	held, used := run.held, run.used
	backends, err := hotplug.ListBackends(ctx, d.store)
	if err != nil {
		// Without the list nothing can be told apart: keep every adopted device
		// (closing one a VM uses would be worse than holding an idle one).
		for _, dev := range held {
			used[dev.Rdev()] = true
		}
		d.log.Error("recovery: cannot list backends in XenStore; keeping every adopted loop device", "err", err)
		return sum, err
	}
	for _, b := range backends {
		if _, err := d.step(ctx, b, lifecycle.FromRecovery); err != nil { // act.go
			d.log.Error("recovery: backend not restored", "domid", b.Domid, "devid", b.Devid, "err", err)
		}
	}
	for rdev, dev := range held {
		if used[rdev] {
			continue
		}
		d.log.Info("recovery: no backend uses loop device; releasing it", "dev", dev.Path(), "diskseq", dev.DiskSeq())
		d.model.Release(dev) // an add of its file right after waits for it to be freed
		sum.Closed++
	}
	d.releaseOrphans(ctx) // cluster.go: leases no restored attachment adopted
	d.log.Info("recovery done", "adopted", sum.Adopted, "reopened", sum.Reopened, "restored", sum.Restored,
		"closed", sum.Closed, "rejected", sum.Rejected, "mismatched", sum.Mismatched, "stock", sum.Stock, "foreign", sum.Foreign)
	d.metrics.countRecoveries(sum)
	return sum, nil
}

// adoptStored takes over the fds the fd store returned, after verifying each.
func (d *Daemon) adoptStored(files []fdstore.File, tag string, sum *RecoverySummary) map[uint64]HeldLoop {
	held := map[uint64]HeldLoop{}
	for _, f := range files {
		dev, err := verifyStored(f, tag)
		if err == nil && held[dev.Rdev()] != nil {
			// Two fds under one name (should not happen: Store replaces by
			// name): one copy is enough.
			dev.Close()
			continue
		}
		if err != nil {
			d.log.Error("recovery: stored fd rejected; closing it and removing it from the fd store", "name", f.Name, "err", err)
			if dev != nil {
				dev.Close()
			} else {
				unix.Close(f.Fd)
			}
			if err := fdstore.Remove(f.Name); err != nil {
				d.log.Error("recovery: remove from the fd store", "name", f.Name, "err", err)
			}
			sum.Rejected++
			continue
		}
		held[dev.Rdev()] = &storedDevice{Device: dev, name: f.Name}
		sum.Adopted++
	}
	return held
}

// verifyStored adopts f if it is the loop device binding its name records.
// On error the returned device (if any) owns f.Fd and must be closed.
func verifyStored(f fdstore.File, tag string) (*loop.Device, error) {
	number, diskseq, err := fdstore.ParseLoopName(f.Name)
	if err != nil {
		return nil, err
	}
	dev, err := loop.Adopt(f.Fd)
	if err != nil {
		return nil, err
	}
	switch {
	case dev.Number() != number:
		return dev, fmt.Errorf("fd is %s, its name says loop%d", dev.Path(), number)
	case dev.DiskSeq() != diskseq:
		return dev, fmt.Errorf("%s has diskseq %d, its name says %d", dev.Path(), dev.DiskSeq(), diskseq)
	case !strings.HasPrefix(dev.Tag(), tag):
		return dev, fmt.Errorf("%s carries tag %q, not ours (%q)", dev.Path(), dev.Tag(), tag)
	}
	return dev, nil
}

// restore rebuilds the attachment of backend s.Backend from what
// physical-device names (the action doRestore, or doAdoptStock when stock:
// the stock block script's loop device).
func (d *Daemon) restore(ctx context.Context, s hotplug.Snapshot, stock bool, run *recoveryRun) error {
	pdev := s.Value(hotplug.PhysicalDevice)
	rdev, err := hotplug.ParseRdev(pdev)
	if err != nil {
		return err
	}
	req, err := s.Request()
	if err != nil {
		return err
	}
	mode, err := model.ParseMode(req.Mode)
	if err != nil {
		return err
	}
	backing, target, err := openTarget(req.Params, mode.Writable)
	if err != nil {
		if unix.Major(rdev) == loop.Major && run.held[rdev] != nil {
			run.used[rdev] = true // a VM may use it: keep it, we cannot tell
		}
		return fmt.Errorf("physical-device %s: %w", pdev, err)
	}
	backing.Close()
	a := model.Attachment{Key: keyOf(s.Backend), Params: req.Params, Mode: mode, Target: target}
	switch {
	case target.Kind == model.BlockDevice:
		return d.restoreBlock(ctx, s.Backend, a, rdev, pdev, run)
	case stock:
		return d.adoptStock(ctx, s.Backend, stockDevice{pdev: pdev, rdev: rdev, node: s.Value(hotplug.StockNode)}, a, run)
	}
	return d.restoreLoop(ctx, s, a, rdev, run)
}

// restoreBlock restores a block device attachment: params must still be the
// device physical-device names.
func (d *Daemon) restoreBlock(ctx context.Context, b hotplug.Backend, a model.Attachment, rdev uint64, pdev string, run *recoveryRun) error {
	if a.Target.Rdev != rdev {
		return fmt.Errorf("physical-device is %s but params %s is now %s; left as it is",
			pdev, a.Params, hotplug.FormatRdev(a.Target.Rdev))
	}
	a.DevPath, a.Rdev = a.Target.Path, a.Target.Rdev
	if err := d.model.Restore(a, nil); err != nil {
		return err
	}
	run.sum.Restored++
	d.logDisk(ctx, slog.LevelInfo, "recovered", diskLine{b: b, target: a.Target.Path, dev: a.Target.Path}, "mode", a.Mode)
	return nil
}

// restoreLoop restores a loop device attachment: the device must still be
// the one diskseq records (from the fd store, else re-opened by number),
// bound to params' file, writable if mode is.
func (d *Daemon) restoreLoop(ctx context.Context, s hotplug.Snapshot, a model.Attachment, rdev uint64, run *recoveryRun) error {
	seqStr := s.Value(hotplug.DiskSeq)
	diskseq, serr := hotplug.ParseDiskSeq(seqStr)
	dev := run.held[rdev]
	var why error
	switch {
	case unix.Major(rdev) != loop.Major:
		why = fmt.Errorf("physical-device %s is not a loop device but params %s is a file", s.Value(hotplug.PhysicalDevice), a.Params)
	case serr != nil || diskseq == 0:
		why = fmt.Errorf("diskseq %q is missing or malformed: the device cannot be identified", seqStr)
	case dev != nil && dev.DiskSeq() != diskseq:
		why = fmt.Errorf("the stored fd of %s has diskseq %d, XenStore records %d", dev.Path(), dev.DiskSeq(), diskseq)
	case dev == nil:
		dev, why = d.loops.Reopen(int(unix.Minor(rdev)), diskseq)
		if why == nil {
			run.held[rdev] = dev
			run.sum.Reopened++
		}
	}
	if why == nil && dev.Backing() != a.Target.File {
		why = fmt.Errorf("%s (diskseq %d) is bound to file %d:%d, params %s is %d:%d",
			dev.Path(), diskseq, dev.Backing().Dev, dev.Backing().Ino, a.Params, a.Target.File.Dev, a.Target.File.Ino)
	}
	if why == nil && a.Mode.Writable && dev.ReadOnly() {
		why = fmt.Errorf("%s is read-only but mode is %s", dev.Path(), a.Mode)
	}
	if why != nil {
		run.sum.Mismatched++
		d.mismatched(ctx, s, rdev, diskseq, why)
		return nil
	}
	if err := d.model.Restore(a, dev); err != nil {
		return err
	}
	run.used[rdev] = true
	run.sum.Restored++
	d.logDisk(ctx, slog.LevelInfo, "recovered", diskLine{b: s.Backend, target: a.Target.Path, dev: dev.Path(), diskseq: dev.DiskSeq()}, "mode", a.Mode)
	return nil
}

// mismatched handles a backend whose loop device is gone or reused: the VM
// cannot use it safely, so physical-device goes and hotplug-error says why.
func (d *Daemon) mismatched(ctx context.Context, s hotplug.Snapshot, rdev, diskseq uint64, why error) {
	b, pdev, params := s.Backend, s.Value(hotplug.PhysicalDevice), text.Truncate(s.Value(hotplug.Params), 200)
	d.logDisk(ctx, slog.LevelError, "recovery: the loop device XenStore names is gone or reused; the VM cannot use it safely. "+
		"Removing physical-device and recording hotplug-error; the device is left alone",
		diskLine{b: b, target: params, dev: "/dev/loop" + strconv.FormatUint(uint64(unix.Minor(rdev)), 10), diskseq: diskseq},
		"physical_device", pdev, "err", why)
	msg := fmt.Sprintf("xenblkd restarted and found physical-device %s (diskseq %s) no longer bound to %s: %v; re-attach the disk",
		pdev, s.Value(hotplug.DiskSeq), params, why)
	if err := d.disconnectWithError(ctx, b, msg); err != nil {
		d.log.Error("recovery: could not clear physical-device", "domid", b.Domid, "devid", b.Devid, "err", err)
	}
}

// disconnectWithError removes physical-device and diskseq, then records msg in
// hotplug-error (not if the backend is gone meanwhile).
func (d *Daemon) disconnectWithError(ctx context.Context, b hotplug.Backend, msg string) error {
	if err := hotplug.Disconnect(ctx, d.store, b); err != nil {
		return err
	}
	if err := hotplug.Fail(ctx, d.store, b, msg); err != nil && !errors.Is(err, hotplug.ErrBackendGone) {
		return err
	}
	return nil
}
