// Package model keeps xenblkd's attachments: which backend (domain, device)
// uses which target, the read-only loop-device cache, and the sharing rules.
// It knows nothing of sockets or XenStore and makes no ioctls itself: the
// machine is reached through Host.
//
// Every change of state goes through Add, Remove or Restore. Add is what
// both pre-setup (the daemon reacting to a new backend before libxl execs the
// script) and the exec'd add call; Restore is what recovery after a daemon
// restart, and adoption of the stock script's devices, call.
package model

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"sync"
	"time"

	"xenblkd/internal/keyed"
)

// Key identifies a backend: the frontend domain and the virtual device number,
// i.e. backend/vbd/<Domid>/<Devid>.
type Key struct {
	Domid uint32
	Devid uint32
}

func (k Key) String() string { return fmt.Sprintf("domain %d device %d", k.Domid, k.Devid) }

// Describe is String with the device's name when the number encodes one
// ("domain 3 device 51712 (xvda)").
func (k Key) Describe() string {
	if n := VdevName(k.Devid); n != "" {
		return fmt.Sprintf("%s (%s)", k, n)
	}
	return k.String()
}

// FileID identifies a regular file by st_dev and st_ino.
type FileID struct {
	Dev uint64
	Ino uint64
}

// Kind says what a backend's params resolved to.
type Kind int

const (
	BlockDevice Kind = iota + 1 // used as is
	RegularFile                 // gets a loop device
)

func (k Kind) String() string {
	switch k {
	case BlockDevice:
		return "block device"
	case RegularFile:
		return "file"
	}
	return "unknown"
}

// Target is what a backend's params resolved to, as fstat (and, for a block
// device, the loop driver and sysfs) saw the opened fd.
type Target struct {
	Kind Kind
	Path string // the resolved path, for messages and physical-device-path of block devices
	File FileID // RegularFile: the file's identity
	Rdev uint64 // BlockDevice: st_rdev

	// BlockDevice only: what the device stands for besides itself.
	Backing     FileID   // a loop device: the file bound to it (zero if not a loop device)
	BackingPath string   // a loop device: the backing file's name, for messages
	Whole       uint64   // a partition: st_rdev of its whole disk (0 if not a partition)
	Partitions  []uint64 // a whole disk: st_rdev of each of its partitions
}

// targetID identifies a target: one per file or block device.
type targetID struct {
	kind Kind
	a, b uint64
}

func (t Target) id() targetID {
	if t.Kind == RegularFile {
		return targetID{RegularFile, t.File.Dev, t.File.Ino}
	}
	return targetID{BlockDevice, t.Rdev, 0}
}

// Device is a loop device the model owns (the daemon's held fd).
type Device interface {
	Path() string
	Rdev() uint64
	DiskSeq() uint64
	// DirectIO reports whether the device does direct I/O to its image file
	// (no dom0 page cache), as verified with the kernel.
	DirectIO() bool
	// BlockSize is the logical block size the device presents to the guest.
	BlockSize() uint32
	// Verify fails if the device is no longer bound as it was when made.
	Verify() error
	// Close releases the held fd; AUTOCLEAR frees the device once the last
	// opener (xen-blkback) lets go.
	Close() error
}

// Binding is a loop device bound to a file, whoever bound it.
type Binding struct {
	Path    string
	Rdev    uint64
	DiskSeq uint64
	Tag     string
	Ours    bool // Tag is the one the daemon gives its devices (lo_file_name starts with --tag)
}

// Host is what the model needs from the machine.
type Host interface {
	// NewLoop binds a new AUTOCLEAR loop device to backing.
	NewLoop(backing *os.File, readOnly bool) (Device, error)
	// LoopsOf lists every loop device bound to the file, leaving out those
	// held reports true for; held gets a device's path and is called before
	// the device is opened, so a host with many of our devices need not
	// inspect them.
	LoopsOf(file FileID, held func(path string) bool) ([]Binding, error)
	// Mounts returns the mounts, in this mount namespace, of any of the
	// block devices devs.
	Mounts(devs []uint64) ([]Mount, error)
}

// Mount is one mount of a block device in the daemon's domain.
type Mount struct {
	Rdev     uint64 // the mounted device
	Source   string // as mountinfo names it (e.g. /dev/sdb1)
	Point    string // where it is mounted
	ReadOnly bool
}

// Leases guards targets other hosts may use too (cluster mode,
// internal/lease). The model takes a target's lease once the local sharing
// rules allow an add, and lets go of it when the backend goes; Restore takes
// it again (adopting what the previous daemon left). nil: nothing is shared
// beyond this host.
type Leases interface {
	// Acquire takes or joins the lease of req.Target for req.Key, or refuses
	// (an error matching ErrConflict names who holds it). A target that is
	// not shared costs nothing.
	Acquire(ctx context.Context, req LeaseRequest) error
	// Release says key no longer uses t.
	Release(key Key, t Target)
}

// LeaseRequest asks Leases for a target's lease.
type LeaseRequest struct {
	Key      Key
	Target   Target
	Writable bool
	// Domain says which VM the backend's domain belongs to (migration
	// between hosts); nil: not known.
	Domain func(ctx context.Context, domid uint32) Domain
}

// AddRequest asks for target to be attached to backend Key.
type AddRequest struct {
	Key     Key
	Params  string // BE/params as read, for the record and messages
	Mode    Mode
	Target  Target
	Backing *os.File // opened with the access Mode asks for; the caller closes it
	// Domains says what the toolstack says about a domain, for the same-VM
	// and stub-domain exceptions. It is asked only when a target that one of
	// the two uses writable is shared across domains; nil: nothing is known.
	Domains func(ctx context.Context, domid uint32) Domain
}

// Attachment is a snapshot of one backend's attachment.
type Attachment struct {
	Key     Key
	Params  string
	Mode    Mode
	Target  Target
	DevPath string    // physical-device-path
	Rdev    uint64    // physical-device
	DiskSeq uint64    // loop devices only; 0 for block devices
	IO      IOMode    // loop devices only; zero for block devices
	Users   int       // backends sharing the device (read-only cache), else 1
	Since   time.Time // when Add recorded it (Restore keeps what it is given)
}

// IOMode is how a loop device reads and writes its image file.
type IOMode struct {
	DirectIO  bool   // direct I/O: the image's data is not cached in dom0
	BlockSize uint32 // logical block size the guest sees
}

// String is "direct" or "buffered", with the block size: "direct/512".
func (io IOMode) String() string {
	if io.BlockSize == 0 {
		return "-"
	}
	mode := "buffered"
	if io.DirectIO {
		mode = "direct"
	}
	return fmt.Sprintf("%s/%d", mode, io.BlockSize)
}

func ioModeOf(d Device) IOMode { return IOMode{DirectIO: d.DirectIO(), BlockSize: d.BlockSize()} }

// ConflictError is a refusal by the sharing rules.
type ConflictError struct {
	Key    Key
	Target Target
	Reason string
}

func (e *ConflictError) Error() string {
	what := e.Target.Path
	if e.Target.BackingPath != "" {
		what += " (a loop device bound to " + e.Target.BackingPath + ")"
	}
	return fmt.Sprintf("refusing to attach %s %s to %s: %s", e.Target.Kind, what, e.Key.Describe(), e.Reason)
}

// ErrConflict matches every *ConflictError with errors.Is.
var ErrConflict = errors.New("sharing conflict")

func (e *ConflictError) Is(target error) bool { return target == ErrConflict }

// loopDevice is a device the model holds, with the backends using it.
type loopDevice struct {
	dev      Device
	readOnly bool
	file     FileID
	users    map[Key]bool
}

type attachment struct {
	Attachment
	loop *loopDevice // nil for block devices
}

func (a *attachment) snapshot() Attachment {
	s := a.Attachment
	s.Users = 1
	if a.loop != nil {
		s.Users = len(a.loop.users)
	}
	return s
}

// Model is the set of attachments. The zero value is not usable: use New.
//
// Locking: per-target locks (locks, Target.lockIDs) are held across the slow
// work of one add or remove (sharing checks against the host, loop setup) so
// two requests for targets that may conflict serialise, and requests for
// unrelated targets never wait on each other. mu guards the maps below and is
// never held across slow work. The order against the daemon's locks is
// written down once, in internal/keyed.
type Model struct {
	host   Host
	log    *slog.Logger
	locks  keyed.Mutex[targetID] // lock order: internal/keyed
	leases Leases                // nil: no cluster mode; set by SetLeases before use

	mu          sync.Mutex
	attachments map[Key]*attachment              // guarded by mu
	byShare     map[shareKey]map[Key]*attachment // guarded by mu: attachments by what they occupy (sharing.go)
	readOnly    map[FileID]*loopDevice           // guarded by mu: the read-only cache
	devices     map[uint64]*loopDevice           // guarded by mu: every held device by rdev
	devicePaths map[string]*loopDevice           // guarded by mu: the same devices by path
	// released are the devices let go of, by rdev, until that number is
	// bound by us again (sharing.go: an add waits for them to be freed).
	// Bounded by the loop device numbers the host ever used for us.
	released map[uint64]releasedDevice // guarded by mu

	releaseWait time.Duration // how long an add waits for a released device to be freed; set by New
	releasePoll time.Duration // how often it looks meanwhile; set by New
}

// New returns an empty model.
func New(host Host, log *slog.Logger) *Model {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Model{
		host:        host,
		log:         log,
		attachments: map[Key]*attachment{},
		byShare:     map[shareKey]map[Key]*attachment{},
		readOnly:    map[FileID]*loopDevice{},
		devices:     map[uint64]*loopDevice{},
		devicePaths: map[string]*loopDevice{},
		released:    map[uint64]releasedDevice{},
		releaseWait: ReleaseWait,
		releasePoll: releasePoll,
	}
}

// SetLeases makes the model hold leases of shared targets (cluster mode).
// Call it before the first Add or Restore.
func (m *Model) SetLeases(l Leases) { m.leases = l }

// Add attaches req.Target to req.Key, enforcing the sharing rules unless the
// mode has '!'. Adding a backend that is already attached to the same target
// with the same mode returns the existing attachment (idempotent).
func (m *Model) Add(ctx context.Context, req AddRequest) (Attachment, error) {
	tid := req.Target.id()
	unlock := m.locks.LockAll(req.Target.lockIDs())
	defer unlock()
	if err := ctx.Err(); err != nil {
		return Attachment{}, err
	}

	m.mu.Lock()
	if a, ok := m.attachments[req.Key]; ok {
		m.mu.Unlock()
		if a.Target.id() == tid && a.Mode == req.Mode {
			return a.snapshot(), nil
		}
		return Attachment{}, fmt.Errorf("%s is already attached to %s %s (mode %s): remove it first",
			req.Key, a.Target.Kind, a.Target.Path, a.Mode)
	}
	var others []*attachment
	if !req.Mode.Force {
		others = m.sharersLocked(req)
	}
	m.mu.Unlock()
	if !req.Mode.Force {
		if err := m.excuse(ctx, req, others); err != nil {
			return Attachment{}, err
		}
		if err := m.checkHost(ctx, req); err != nil {
			return Attachment{}, err
		}
		if m.leases != nil {
			// After the local rules: a refusal here is another host's use.
			if err := m.leases.Acquire(ctx, LeaseRequest{Key: req.Key, Target: req.Target,
				Writable: req.Mode.Writable, Domain: req.Domains}); err != nil {
				return Attachment{}, err
			}
		}
	}

	a := &attachment{Attachment: Attachment{
		Key: req.Key, Params: req.Params, Mode: req.Mode, Target: req.Target, Since: time.Now(),
	}}
	if req.Target.Kind == BlockDevice {
		a.DevPath, a.Rdev = req.Target.Path, req.Target.Rdev
	} else {
		ld, fresh, err := m.loopFor(req)
		if err != nil {
			m.releaseLease(req.Key, req.Target, req.Mode)
			return Attachment{}, err
		}
		a.loop = ld
		a.DevPath, a.Rdev, a.DiskSeq, a.IO = ld.dev.Path(), ld.dev.Rdev(), ld.dev.DiskSeq(), ioModeOf(ld.dev)
		if fresh {
			m.log.Debug("loop device bound", "domid", req.Key.Domid, "devid", req.Key.Devid,
				"dev", a.DevPath, "diskseq", a.DiskSeq, "file", req.Target.Path, "readonly", !req.Mode.Writable,
				"io", a.IO.String())
		} else {
			m.log.Debug("loop device shared", "domid", req.Key.Domid, "devid", req.Key.Devid,
				"dev", a.DevPath, "diskseq", a.DiskSeq, "file", req.Target.Path)
		}
	}

	m.mu.Lock()
	if _, taken := m.attachments[req.Key]; taken {
		// A concurrent add for the same backend but another target won.
		release := m.dropUserLocked(a)
		m.mu.Unlock()
		m.closeDevice(release)
		m.releaseLease(req.Key, req.Target, req.Mode)
		return Attachment{}, fmt.Errorf("%s: attached concurrently by another request", req.Key)
	}
	m.insertLocked(a)
	snap := a.snapshot()
	m.mu.Unlock()
	return snap, nil
}

// holds reports whether the model holds the loop device at path. A device we
// hold the fd of stays bound as we bound it (our fd defers AUTOCLEAR and
// LOOP_CLR_FD), so leaving it out of LoopsOf loses nothing checkHost needs.
func (m *Model) holds(path string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.devicePaths[path]
	return ok
}

// loopFor returns the cached read-only device for the file or binds a new one.
// Called with the target lock held, so the cache entry cannot go away.
func (m *Model) loopFor(req AddRequest) (ld *loopDevice, fresh bool, err error) {
	readOnly := !req.Mode.Writable
	if readOnly {
		m.mu.Lock()
		ld = m.readOnly[req.Target.File]
		m.mu.Unlock()
		if ld != nil {
			return ld, false, nil
		}
	}
	dev, err := m.host.NewLoop(req.Backing, readOnly)
	if err != nil {
		return nil, false, fmt.Errorf("bind a loop device to %s: %w", req.Target.Path, err)
	}
	return &loopDevice{dev: dev, readOnly: readOnly, file: req.Target.File, users: map[Key]bool{}}, true, nil
}

// insertLocked records a, which must not be recorded yet.
func (m *Model) insertLocked(a *attachment) {
	m.attachments[a.Key] = a
	for _, k := range a.Target.shareKeys() {
		if m.byShare[k] == nil {
			m.byShare[k] = map[Key]*attachment{}
		}
		m.byShare[k][a.Key] = a
	}
	if ld := a.loop; ld != nil {
		ld.users[a.Key] = true
		delete(m.released, ld.dev.Rdev()) // the number is ours again, with another diskseq
		m.devices[ld.dev.Rdev()] = ld
		m.devicePaths[ld.dev.Path()] = ld
		if ld.readOnly {
			m.readOnly[ld.file] = ld
		}
	}
}

// dropUserLocked forgets a's use of its device and returns the device if a
// was its last user (the caller closes it outside mu).
func (m *Model) dropUserLocked(a *attachment) Device {
	ld := a.loop
	if ld == nil {
		return nil
	}
	delete(ld.users, a.Key)
	if len(ld.users) > 0 {
		return nil
	}
	if m.devices[ld.dev.Rdev()] == ld {
		delete(m.devices, ld.dev.Rdev())
	}
	if m.devicePaths[ld.dev.Path()] == ld {
		delete(m.devicePaths, ld.dev.Path())
	}
	if ld.readOnly && m.readOnly[ld.file] == ld {
		delete(m.readOnly, ld.file)
	}
	return ld.dev
}

// closeDevice releases a device no backend uses any more. A device whose
// identity changed (diskseq differs) is not ours to free: its fd is left open
// rather than risk clearing someone else's binding.
func (m *Model) closeDevice(dev Device) {
	if dev == nil {
		return
	}
	if err := dev.Verify(); err != nil {
		m.log.Error("loop device changed under us; not releasing it", "dev", dev.Path(), "diskseq", dev.DiskSeq(), "err", err)
		return
	}
	m.noteReleased(dev)
	if err := dev.Close(); err != nil {
		m.log.Error("release loop device", "dev", dev.Path(), "diskseq", dev.DiskSeq(), "err", err)
		return
	}
	m.log.Debug("loop device released", "dev", dev.Path(), "diskseq", dev.DiskSeq())
}

// Release releases dev, a device of ours the model does not hold (recovery:
// an adopted device no backend uses), so that an add of its file right after
// waits for it to be freed as after a Remove.
func (m *Model) Release(dev Device) {
	m.mu.Lock()
	_, held := m.devices[dev.Rdev()]
	m.mu.Unlock()
	if held {
		return // a backend uses it (Restore): Remove releases it
	}
	m.closeDevice(dev)
}

// Remove releases key's attachment, closing its loop device if it was the
// last user. It reports whether key was attached; removing twice is fine.
func (m *Model) Remove(key Key) (Attachment, bool) {
	m.mu.Lock()
	a := m.attachments[key]
	m.mu.Unlock()
	if a == nil {
		return Attachment{}, false
	}
	unlock := m.locks.LockAll(a.Target.lockIDs())
	defer unlock()

	m.mu.Lock()
	if m.attachments[key] != a { // removed (or replaced) while we waited
		m.mu.Unlock()
		return Attachment{}, false
	}
	snap := a.snapshot()
	delete(m.attachments, key)
	for _, k := range a.Target.shareKeys() {
		delete(m.byShare[k], key)
		if len(m.byShare[k]) == 0 {
			delete(m.byShare, k)
		}
	}
	release := m.dropUserLocked(a)
	m.mu.Unlock()

	snap.Users--
	m.closeDevice(release)
	m.releaseLease(key, a.Target, a.Mode)
	return snap, true
}

// releaseLease lets go of key's use of t's lease (mode w! took none).
func (m *Model) releaseLease(key Key, t Target, mode Mode) {
	if m.leases != nil && !mode.Force {
		m.leases.Release(key, t)
	}
}

// Restore records an attachment rebuilt after a restart (an adopted device
// plus the backend's XenStore record). Backends naming the same read-only
// device share it. dev is nil for block devices.
func (m *Model) Restore(a Attachment, dev Device) error {
	unlock := m.locks.LockAll(a.Target.lockIDs())
	defer unlock()
	m.mu.Lock()
	if _, ok := m.attachments[a.Key]; ok {
		m.mu.Unlock()
		return fmt.Errorf("restore %s: already attached", a.Key)
	}
	rec := &attachment{Attachment: a}
	if a.Target.Kind == RegularFile {
		if dev == nil {
			m.mu.Unlock()
			return fmt.Errorf("restore %s: a file attachment needs its loop device", a.Key)
		}
		ld := m.devices[dev.Rdev()]
		if ld == nil {
			ld = &loopDevice{dev: dev, readOnly: !a.Mode.Writable, file: a.Target.File, users: map[Key]bool{}}
		}
		rec.loop = ld
		rec.DevPath, rec.Rdev, rec.DiskSeq, rec.IO = dev.Path(), dev.Rdev(), dev.DiskSeq(), ioModeOf(dev)
	}
	m.insertLocked(rec)
	m.mu.Unlock()
	if m.leases != nil && !a.Mode.Force {
		// The guest runs on this disk already: a lease that cannot be had
		// back is reported, never a reason to take the disk away.
		if err := m.leases.Acquire(context.Background(), LeaseRequest{Key: a.Key, Target: a.Target, Writable: a.Mode.Writable}); err != nil {
			m.log.Error("recovery: could not re-adopt the lease of a shared target: another host may attach it",
				"domid", a.Key.Domid, "devid", a.Key.Devid, "target", a.Target.Path, "err", err)
		}
	}
	return nil
}

// Lookup returns key's attachment.
func (m *Model) Lookup(key Key) (Attachment, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	a, ok := m.attachments[key]
	if !ok {
		return Attachment{}, false
	}
	return a.snapshot(), true
}

// List returns every attachment, ordered by domain and device.
func (m *Model) List() []Attachment {
	m.mu.Lock()
	out := make([]Attachment, 0, len(m.attachments))
	for _, a := range m.attachments {
		out = append(out, a.snapshot())
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return less(out[i].Key, out[j].Key) })
	return out
}

func less(a, b Key) bool {
	if a.Domid != b.Domid {
		return a.Domid < b.Domid
	}
	return a.Devid < b.Devid
}
