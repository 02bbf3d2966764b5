package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"xenblkd/internal/fdstore"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/loop"
	"xenblkd/internal/model"
)

// storedDevice is a loop device whose fd is also in systemd's fd store under
// name, so that a crash of the daemon does not free it. Close takes it out of
// the store before closing our own copy: the device is freed only once both
// copies (and blkback's) are gone.
type storedDevice struct {
	*loop.Device
	name string
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
	// Tag is the lo_file_name prefix of our devices (DefaultTag if empty).
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

// directoryReader lists XenStore children; hotplug.ClientStore has it.
type directoryReader interface {
	Directory(ctx context.Context, path string) ([]string, error)
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
		opts.Tag = DefaultTag
	}
	d.tag = opts.Tag
	held := d.adoptStored(opts.Stored, opts.Tag, &sum) // by rdev
	used := map[uint64]bool{}

	backends, err := d.ourBackends(ctx)
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
		if err := d.restoreBackend(ctx, b, held, used, &sum); err != nil {
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
	d.log.Info("recovery done", "adopted", sum.Adopted, "reopened", sum.Reopened, "restored", sum.Restored,
		"closed", sum.Closed, "rejected", sum.Rejected, "mismatched", sum.Mismatched, "stock", sum.Stock, "foreign", sum.Foreign)
	d.metrics.countRecoveries(sum)
	return sum, nil
}

// adoptStored takes over the fds the fd store returned, after verifying each.
func (d *Daemon) adoptStored(files []fdstore.File, tag string, sum *RecoverySummary) map[uint64]*storedDevice {
	held := map[uint64]*storedDevice{}
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

// ourBackends lists backend/vbd/<domid>/<devid> whose script is ours.
func (d *Daemon) ourBackends(ctx context.Context) ([]hotplug.Backend, error) {
	dr, ok := d.store.(directoryReader)
	if !ok {
		return nil, errors.New("the XenStore connection cannot list directories")
	}
	domains, err := dr.Directory(ctx, "backend/vbd")
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list backend/vbd: %w", err)
	}
	var out []hotplug.Backend
	for _, dom := range domains {
		devs, err := dr.Directory(ctx, "backend/vbd/"+dom)
		if errors.Is(err, unix.ENOENT) {
			continue // domain destroyed meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("list backend/vbd/%s: %w", dom, err)
		}
		for _, dev := range devs {
			b, err := hotplug.ParseBackendPath("backend/vbd/" + dom + "/" + dev)
			if err != nil {
				continue // not libxl's
			}
			script, err := d.store.Read(ctx, b.Path()+"/script")
			if err != nil || !d.Scripts.Ours(script) {
				continue
			}
			out = append(out, b)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Domid != out[j].Domid {
			return out[i].Domid < out[j].Domid
		}
		return out[i].Devid < out[j].Devid
	})
	return out, nil
}

// restoreBackend rebuilds one backend's attachment, if physical-device is set.
func (d *Daemon) restoreBackend(ctx context.Context, b hotplug.Backend, held map[uint64]*storedDevice, used map[uint64]bool, sum *RecoverySummary) error {
	log := d.log.With("domid", b.Domid, "devid", b.Devid)
	pdev, err := d.store.Read(ctx, b.Path()+"/physical-device")
	if errors.Is(err, unix.ENOENT) {
		return nil // not attached (an add that never completed, or removed)
	}
	if err != nil {
		return fmt.Errorf("read physical-device: %w", err)
	}
	rdev, err := parseRdev(pdev)
	if err != nil {
		return err
	}
	req, err := hotplug.ReadRequest(ctx, d.store, b)
	if err != nil {
		return err
	}
	mode, err := model.ParseMode(req.Mode)
	if err != nil {
		return err
	}
	backing, target, err := openTarget(req.Params, mode.Writable)
	if err != nil {
		if unix.Major(rdev) == 7 {
			if dev := held[rdev]; dev != nil {
				used[rdev] = true // a VM may use it: keep it, we cannot tell
			}
		}
		return fmt.Errorf("physical-device %s: %w", pdev, err)
	}
	backing.Close()
	key := model.Key{Domid: b.Domid, Devid: b.Devid}
	a := model.Attachment{Key: key, Params: req.Params, Mode: mode, Target: target, Domain: domainOf(req.Frontend)}

	if target.Kind == model.BlockDevice {
		if target.Rdev != rdev {
			return fmt.Errorf("physical-device is %s but params %s is now %s; left as it is",
				pdev, req.Params, hotplug.FormatRdev(target.Rdev))
		}
		a.DevPath, a.Rdev = target.Path, target.Rdev
		if err := d.model.Restore(a, nil); err != nil {
			return err
		}
		sum.Restored++
		d.decision(ctx, slog.LevelInfo, "recovered", diskLine{b: b, target: target.Path, dev: target.Path}, "mode", mode)
		return nil
	}

	seqStr, seqErr := d.store.Read(ctx, b.Path()+"/diskseq")
	if errors.Is(seqErr, unix.ENOENT) {
		// No diskseq: the stock block script's device, if it wrote node.
		if node, err := d.store.Read(ctx, b.Path()+"/node"); err == nil {
			return d.adoptStock(ctx, b, stockDevice{pdev: pdev, rdev: rdev, node: node}, a, held, used, sum)
		}
	}
	diskseq, serr := strconv.ParseUint(seqStr, 16, 64)
	dev := held[rdev]
	var why error
	switch {
	case unix.Major(rdev) != 7:
		why = fmt.Errorf("physical-device %s is not a loop device but params %s is a file", pdev, req.Params)
	case serr != nil || diskseq == 0:
		why = fmt.Errorf("diskseq %q is missing or malformed: the device cannot be identified", seqStr)
	case dev != nil && dev.DiskSeq() != diskseq:
		why = fmt.Errorf("the stored fd of %s has diskseq %d, XenStore records %d", dev.Path(), dev.DiskSeq(), diskseq)
	case dev == nil:
		opened, err := loop.Open(int(unix.Minor(rdev)), diskseq)
		if err != nil {
			why = err
			break
		}
		dev, err = storeLoop(opened)
		if err != nil {
			opened.Close()
			why = err
			break
		}
		held[rdev] = dev
		sum.Reopened++
	}
	if why == nil && dev.Backing() != loop.FileID(target.File) {
		why = fmt.Errorf("%s (diskseq %d) is bound to file %d:%d, params %s is %d:%d",
			dev.Path(), diskseq, dev.Backing().Dev, dev.Backing().Ino, req.Params, target.File.Dev, target.File.Ino)
	}
	if why == nil && mode.Writable && dev.ReadOnly() {
		why = fmt.Errorf("%s is read-only but mode is %s", dev.Path(), mode)
	}
	if why != nil {
		sum.Mismatched++
		d.decision(ctx, slog.LevelError, "recovery: the loop device XenStore names is gone or reused; the VM cannot use it safely. "+
			"Removing physical-device and recording hotplug-error; the device is left alone",
			diskLine{b: b, target: model.Quote(req.Params, 200), dev: "/dev/loop" + strconv.FormatUint(uint64(unix.Minor(rdev)), 10), diskseq: diskseq},
			"physical_device", pdev, "err", why)
		msg := fmt.Sprintf("xenblkd restarted and found physical-device %s (diskseq %s) no longer bound to %s: %v; re-attach the disk",
			pdev, seqStr, model.Quote(req.Params, 200), why)
		if err := d.forget(ctx, b, msg); err != nil {
			log.Error("recovery: could not clear physical-device", "err", err)
		}
		return nil
	}
	if err := d.model.Restore(a, dev); err != nil {
		return err
	}
	used[rdev] = true
	sum.Restored++
	d.decision(ctx, slog.LevelInfo, "recovered", diskLine{b: b, target: target.Path, dev: dev.Path(), diskseq: dev.DiskSeq()}, "mode", mode)
	return nil
}

// forget removes physical-device and diskseq, then records msg in
// hotplug-error (not if the backend is gone meanwhile).
func (d *Daemon) forget(ctx context.Context, b hotplug.Backend, msg string) error {
	if err := hotplug.Disconnect(ctx, d.store, b); err != nil {
		return err
	}
	if err := hotplug.Fail(ctx, d.store, b, msg); err != nil && !errors.Is(err, hotplug.ErrBackendGone) {
		return err
	}
	return nil
}

// parseRdev parses physical-device ("%x:%x").
func parseRdev(s string) (uint64, error) {
	maj, min, ok := strings.Cut(s, ":")
	a, err1 := strconv.ParseUint(maj, 16, 32)
	b, err2 := strconv.ParseUint(min, 16, 32)
	if !ok || err1 != nil || err2 != nil {
		return 0, fmt.Errorf("physical-device %q is not major:minor in hex", model.Quote(s, 32))
	}
	return unix.Mkdev(uint32(a), uint32(b)), nil
}
