package model

// The sharing rules (docs/sharing.md has the table of cases).
//
// What a target occupies: a file is occupied by every backend that uses it,
// directly or through a loop device bound to it (ours or not); a block device
// by every backend that uses it, and a whole disk and its partitions occupy
// each other. Two backends of different domains may occupy the same thing
// only if both are read-only, or if both domains belong to the same VM (a
// migration to localhost, a restore overlapping the old domain) or one is the
// device-model stub domain of the other. Mode w! skips every check.

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"time"
)

// Domain is what the toolstack says about a frontend domain, read from nodes
// only the toolstack can write. A field is "" when its node is missing or a
// guest could have written it: such a domain never matches another.
type Domain struct {
	VM       string // /local/domain/<id>/vm
	TargetVM string // a stub domain: the vm of the domain it serves (/local/domain/<target>/vm)
}

// sameVM says why domains a and b may share a writable target ("" if not),
// as the stock script's same_vm: the same VM, one is the stub domain of a
// domain of the other's VM, or both are stub domains of one VM (an HVM
// guest's stub domain migrating to localhost). Unknown identities never match.
func sameVM(a, b Domain) string {
	switch {
	case a.VM != "" && a.VM == b.VM:
		return "same VM"
	case a.TargetVM != "" && a.TargetVM == b.VM:
		return "stub domain of that VM"
	case b.TargetVM != "" && b.TargetVM == a.VM:
		return "that domain is this VM's stub domain"
	case a.TargetVM != "" && a.TargetVM == b.TargetVM:
		return "stub domains of the same VM"
	}
	return ""
}

// file returns the file t stands for: the file itself, or the file bound to
// a loop device (zero if none).
func (t Target) file() FileID {
	if t.Kind == RegularFile {
		return t.File
	}
	return t.Backing
}

// shareKey is one thing a target occupies.
type shareKey struct {
	kind byte // 'f' a file, 'b' a block device, 'p' the partitions of a whole disk
	a, b uint64
}

// shareKeys are what an attachment of t is indexed under.
func (t Target) shareKeys() []shareKey {
	var keys []shareKey
	if f := t.file(); f != (FileID{}) {
		keys = append(keys, shareKey{'f', f.Dev, f.Ino})
	}
	if t.Kind == BlockDevice {
		keys = append(keys, shareKey{'b', t.Rdev, 0})
		if t.Whole != 0 {
			keys = append(keys, shareKey{'p', t.Whole, 0})
		}
	}
	return keys
}

// probeKeys are what a request for t looks up: its file, itself, its whole
// disk, and the partitions of itself.
func (t Target) probeKeys() []shareKey {
	var keys []shareKey
	if f := t.file(); f != (FileID{}) {
		keys = append(keys, shareKey{'f', f.Dev, f.Ino})
	}
	if t.Kind == BlockDevice {
		keys = append(keys, shareKey{'b', t.Rdev, 0}, shareKey{'p', t.Rdev, 0})
		if t.Whole != 0 {
			keys = append(keys, shareKey{'b', t.Whole, 0})
		}
	}
	return keys
}

// lockIDs are the per-target locks an add or remove of t takes, in order.
// Targets that may conflict share at least one, so their checks and setups
// serialise: everything standing for one file shares the file's, a whole disk
// and its partitions share the whole disk's (a partition of a loop device
// takes the loop device's, which its loop device shares with its file's).
func (t Target) lockIDs() []targetID {
	var ids []targetID
	if f := t.file(); f != (FileID{}) {
		ids = append(ids, targetID{RegularFile, f.Dev, f.Ino})
	}
	if t.Kind == BlockDevice {
		disk := t.Rdev
		if t.Whole != 0 {
			disk = t.Whole
		}
		ids = append(ids, targetID{BlockDevice, disk, 0})
	}
	sort.Slice(ids, func(i, j int) bool { return lessID(ids[i], ids[j]) })
	return ids
}

func lessID(a, b targetID) bool {
	if a.kind != b.kind {
		return a.kind < b.kind
	}
	if a.a != b.a {
		return a.a < b.a
	}
	return a.b < b.b
}

// sharersLocked returns our attachments that occupy what req's target does
// and need an exception to be shared with it: another domain's, with one of
// the two writable. Ordered by key.
func (m *Model) sharersLocked(req AddRequest) []*attachment {
	seen := map[Key]bool{}
	var others []*attachment
	for _, k := range req.Target.probeKeys() {
		for key, a := range m.byShare[k] {
			if seen[key] {
				continue
			}
			seen[key] = true
			if a.Key.Domid == req.Key.Domid {
				continue // the same domain may attach it again
			}
			if !req.Mode.Writable && !a.Mode.Writable {
				continue // read-only everywhere
			}
			others = append(others, a)
		}
	}
	sort.Slice(others, func(i, j int) bool { return less(others[i].Key, others[j].Key) })
	return others
}

// excuse applies the same-VM and stub-domain exceptions to others (from
// sharersLocked): it asks req.Domains about the domains involved, only now
// that they matter, and returns the conflict with the first one not excused.
// The target locks keep others attached meanwhile; mu is not held.
func (m *Model) excuse(ctx context.Context, req AddRequest, others []*attachment) error {
	if len(others) == 0 {
		return nil
	}
	known := map[uint32]Domain{}
	domainOf := func(domid uint32) Domain {
		d, ok := known[domid]
		if !ok && req.Domains != nil {
			d = req.Domains(ctx, domid)
			known[domid] = d
		}
		return d
	}
	this := domainOf(req.Key.Domid)
	for _, other := range others {
		od := domainOf(other.Key.Domid)
		if why := sameVM(this, od); why != "" {
			m.log.Info("sharing allowed", "domid", req.Key.Domid, "devid", req.Key.Devid, "why", why,
				"other_domid", other.Key.Domid, "other_devid", other.Key.Devid, "other_mode", other.Mode.String(),
				"vm", this.VM, "target_vm", this.TargetVM, "other_vm", od.VM)
			continue
		}
		return &ConflictError{Key: req.Key, Target: req.Target, Reason: conflictReason(req, other)}
	}
	return nil
}

// conflictReason says who uses the target, how, and what to do.
func conflictReason(req AddRequest, other *attachment) string {
	what := "it"
	if rel := relation(req.Target, other.Target); rel != "" {
		what = rel
	}
	how := "read-only"
	if other.Mode.Writable {
		how = "read-write"
	}
	dev := other.DevPath
	if dev == "" {
		dev = other.Target.Path
	}
	var advice string
	if other.Mode.Writable {
		advice = fmt.Sprintf("detach it there first (xl block-detach %d %d) or give this domain its own copy; mode w! overrides",
			other.Key.Domid, other.Key.Devid)
	} else {
		advice = fmt.Sprintf("it can only be shared read-only: use access=ro here, detach it there first (xl block-detach %d %d), or use mode w! to override",
			other.Key.Domid, other.Key.Devid)
	}
	return fmt.Sprintf("%s already uses %s %s (mode %s, %s); %s", other.Key.Describe(), what, how, other.Mode, dev, advice)
}

// relation names other's target as seen from t, "" if it is t itself.
func relation(t, other Target) string {
	switch {
	case t.id() == other.id():
		return ""
	case t.Kind == RegularFile && other.Kind == BlockDevice:
		return "loop device " + other.Path + " (bound to this file)"
	case t.Kind == BlockDevice && other.Kind == RegularFile:
		return "the file " + other.Path + " (bound to this loop device)"
	case t.Backing != (FileID{}) && t.Backing == other.Backing:
		return "loop device " + other.Path + " (bound to the same file)"
	case t.Whole != 0 && t.Whole == other.Rdev:
		return "its whole disk " + other.Path
	case other.Whole != 0 && other.Whole == t.Rdev:
		return "its partition " + other.Path
	}
	return other.Path
}

// checkHost applies the rules that need the machine: loop devices we do not
// hold bound to the file, and mounts of the device (or of its partitions or
// whole disk) in this domain. A read-only request is refused only by what
// is mounted read-write.
func (m *Model) checkHost(ctx context.Context, req AddRequest) error {
	t := req.Target
	// mountsOf: each device whose mounts count, with how to name it.
	mountsOf := map[uint64]string{}
	if t.Kind == BlockDevice {
		mountsOf[t.Rdev] = "it"
		for _, p := range t.Partitions {
			mountsOf[p] = "its partition %s"
		}
		if t.Whole != 0 {
			mountsOf[t.Whole] = "its whole disk %s"
		}
	}
	if f := t.file(); f != (FileID{}) {
		others, err := m.otherLoops(ctx, req, f)
		if err != nil {
			return err
		}
		for _, b := range others {
			mountsOf[b.Rdev] = "loop device %s (bound to the same file)" // read-only: only a read-write mount refuses
		}
	}
	if len(mountsOf) == 0 {
		return nil
	}
	devs := make([]uint64, 0, len(mountsOf))
	for d := range mountsOf {
		devs = append(devs, d)
	}
	sort.Slice(devs, func(i, j int) bool { return devs[i] < devs[j] })
	mounts, err := m.host.Mounts(devs)
	if err != nil {
		return fmt.Errorf("check mounts of %s: %w", t.Path, err)
	}
	for _, mt := range mounts {
		if !req.Mode.Writable && mt.ReadOnly {
			continue
		}
		what := mountsOf[mt.Rdev]
		if what == "" {
			what = "device %s"
		}
		if what != "it" {
			what = fmt.Sprintf(what, mt.Source)
		}
		if req.Mode.Writable {
			return &ConflictError{Key: req.Key, Target: t, Reason: fmt.Sprintf(
				"%s is mounted on %s in this domain; unmount it, or use mode w! to override", what, mt.Point)}
		}
		return &ConflictError{Key: req.Key, Target: t, Reason: fmt.Sprintf(
			"%s is mounted read-write on %s in this domain, so the guest would read it while it changes; unmount it or remount it read-only, or use mode r! to override",
			what, mt.Point)}
	}
	return nil
}

// ReleaseWait bounds how long an add waits for a loop device this daemon
// released to be freed. AUTOCLEAR frees a device at its last close, and
// after our release others may still hold it for a moment: xen-blkback
// finishing its close, udev's blkid probe on the change uevent a close for
// writing causes, systemd closing the fd store's copy (it acts on
// FDSTOREREMOVE after our Close has returned), anyone's scan of the loop
// devices. An add of the same file in that moment (xl reboot: the old
// domain's remove, then the new domain's add) would otherwise find a device
// it does not hold on the file and refuse.
const ReleaseWait = 2 * time.Second

// releasePoll is how often an add waiting for a released device looks again.
const releasePoll = 20 * time.Millisecond

// releasedDevice is a loop device the model let go of.
type releasedDevice struct {
	diskSeq uint64
	at      time.Time
}

// noteReleased records that dev is being let go of (before its fds close, so
// no add can see it unheld and unrecorded).
func (m *Model) noteReleased(dev Device) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.released[dev.Rdev()] = releasedDevice{diskSeq: dev.DiskSeq(), at: time.Now()}
}

// releasedAs returns when the model released b, if b is that very device:
// the same number and diskseq (never reused within a boot), and our tag.
func (m *Model) releasedAs(b Binding) (time.Time, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.released[b.Rdev]
	if !ok || !b.Ours || b.DiskSeq == 0 || r.diskSeq != b.DiskSeq {
		return time.Time{}, false
	}
	return r.at, true
}

// otherLoops returns the loop devices bound to file f that the model does
// not hold and no attachment of ours uses, for a read-only request (only
// their read-write mounts refuse it). A writable request is refused by any
// of them at once, except by a device the model released: that one is on its
// way out, and the request waits for it to be freed, up to releaseWait,
// looking again every releasePoll. It never sleeps holding mu (the target
// lock is held: adds and removes of the same file wait meanwhile).
func (m *Model) otherLoops(ctx context.Context, req AddRequest, f FileID) ([]Binding, error) {
	t := req.Target
	var start time.Time // of the wait
	for {
		bindings, err := m.host.LoopsOf(f, m.holds)
		if err != nil {
			return nil, fmt.Errorf("check loop devices bound to %s: %w", t.Path, err)
		}
		var others, leaving []Binding
		var releasedAt time.Time // of leaving[0]
		for _, b := range bindings {
			if t.Kind == BlockDevice && b.Rdev == t.Rdev {
				continue // the device asked for
			}
			if m.knownLoop(b) {
				continue
			}
			if !req.Mode.Writable {
				others = append(others, b)
				continue
			}
			at, released := m.releasedAs(b)
			if !released {
				return nil, &ConflictError{Key: req.Key, Target: t, Reason: foreignLoopReason(b)}
			}
			if len(leaving) == 0 {
				releasedAt = at
			}
			leaving = append(leaving, b)
		}
		if len(leaving) == 0 {
			if !start.IsZero() {
				m.log.Info("sharing check: the loop device xenblkd released is freed", "domid", req.Key.Domid, "devid", req.Key.Devid,
					"file", t.Path, "waited", time.Since(start).Round(time.Millisecond))
			}
			return others, nil
		}
		now := time.Now()
		if start.IsZero() {
			start = now
			b := leaving[0]
			m.log.Info("sharing check: waiting for the loop device xenblkd released to be freed", "domid", req.Key.Domid, "devid", req.Key.Devid,
				"file", t.Path, "dev", b.Path, "diskseq", b.DiskSeq, "released", now.Sub(releasedAt).Round(time.Millisecond), "bound", m.releaseWait)
		}
		if now.Sub(start) >= m.releaseWait {
			b := leaving[0]
			return nil, &ConflictError{Key: req.Key, Target: t, Reason: fmt.Sprintf(
				"loop device %s (diskseq %d), which xenblkd released %v ago, is still bound to the same file (waited %v for it to be freed): "+
					"something still holds it open; find it with fuser -v %s (if no process is listed, the kernel holds it: a mount, or xen-blkback "+
					"of a domain still being destroyed) and retry once it is closed, or use mode w! to override",
				b.Path, b.DiskSeq, now.Sub(releasedAt).Round(time.Millisecond), m.releaseWait, b.Path)}
		}
		timer := time.NewTimer(m.releasePoll)
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil, fmt.Errorf("wait for loop device %s, released by xenblkd, to be freed: %w", leaving[0].Path, ctx.Err())
		case <-timer.C:
		}
	}
}

// foreignLoopReason says that a loop device we do not hold, and did not
// release, is bound to the file.
func foreignLoopReason(b Binding) string {
	if b.Ours {
		return fmt.Sprintf("loop device %s (tag %q, xenblkd's, but not held by this daemon: another xenblkd with the same --tag made it) is bound to the same file; "+
			"detach it (losetup -d %s) if nothing uses it, or use mode w! to override", b.Path, b.Tag, b.Path)
	}
	return fmt.Sprintf("loop device %s (not made by xenblkd, tag %q) is bound to the same file; detach it (losetup -d %s) if nothing uses it, or use mode w! to override",
		b.Path, b.Tag, b.Path)
}

// knownLoop reports whether b is a loop device the model holds, or one an
// attachment of ours uses as a block device (sharersLocked judged that one).
func (m *Model) knownLoop(b Binding) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if ld, ours := m.devices[b.Rdev]; ours && ld.dev.DiskSeq() == b.DiskSeq {
		return true
	}
	return len(m.byShare[shareKey{'b', b.Rdev, 0}]) > 0
}

// VdevName returns the guest-visible name the virtual device number devid
// encodes (xvda, xvdb3, sdc), or "" if it encodes none (Xen's vbd
// numbering: 202<<8 | disk<<4 | partition for xvd a-p, 1<<28 | disk<<8 |
// partition beyond, 8<<8 | disk<<4 | partition for sd).
func VdevName(devid uint32) string {
	var prefix string
	var disk, part uint32
	switch {
	case devid&(1<<28) != 0 && devid < 1<<29:
		prefix, disk, part = "xvd", (devid>>8)&0xfffff, devid&0xff
	case devid>>8 == 202:
		prefix, disk, part = "xvd", (devid>>4)&15, devid&15
	case devid>>8 == 8:
		prefix, disk, part = "sd", (devid>>4)&15, devid&15
	default:
		return ""
	}
	name := prefix + diskLetters(disk)
	if part != 0 {
		name += strconv.FormatUint(uint64(part), 10)
	}
	return name
}

// diskLetters is a, b, ... z, aa, ab, ... as Linux names disks.
func diskLetters(n uint32) string {
	s := string(rune('a' + n%26))
	for n >= 26 {
		n = n/26 - 1
		s = string(rune('a'+n%26)) + s
	}
	return s
}
