// Package hotplug is the vbd backend's XenStore contract, as libxl and
// xen-blkback expect it from a block script (docs/architecture.md, "XenStore
// contract"): parse XENBUS_PATH, read
// params and mode, write physical-device and friends in one transaction, write
// hotplug-error on failure, clean up on remove. It knows nothing of loop
// devices.
package hotplug

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"xenblkd/internal/text"
	"xenblkd/internal/xenstore"
)

// Limits on values read from XenStore. params is a path (PATH_MAX is 4096,
// but no sane image path is near it); longer values are refused, not cut.
const (
	MaxParams = 1024
	MaxMode   = 8
	// maxError keeps hotplug-error well inside XenStore's 4096-byte payload.
	maxError = 2048
)

// Backend is one vbd backend directory, relative to the caller's domain:
// backend/vbd/<Domid>/<Devid>.
type Backend struct {
	Domid uint32
	Devid uint32
}

// ErrBadPath: XENBUS_PATH is not backend/vbd/<domid>/<devid>.
var ErrBadPath = errors.New("malformed XENBUS_PATH")

// ParseBackendPath parses XENBUS_PATH as libxl passes it: relative,
// "backend/vbd/<domid>/<devid>" with decimal numbers.
func ParseBackendPath(p string) (Backend, error) {
	if p == "" {
		return Backend{}, fmt.Errorf("%w: it is empty or unset; libxl sets it to backend/vbd/<domid>/<devid>", ErrBadPath)
	}
	parts := strings.Split(p, "/")
	if len(parts) != 4 || parts[0] != "backend" || parts[1] != "vbd" {
		return Backend{}, fmt.Errorf("%w %q: want backend/vbd/<domid>/<devid>", ErrBadPath, text.Truncate(p, 64))
	}
	domid, err1 := parseID(parts[2], 0x7fef) // DOMID_FIRST_RESERVED-1
	devid, err2 := parseID(parts[3], 1<<32-1)
	if err1 != nil || err2 != nil {
		return Backend{}, fmt.Errorf("%w %q: domid and devid must be decimal numbers", ErrBadPath, text.Truncate(p, 64))
	}
	return Backend{Domid: uint32(domid), Devid: uint32(devid)}, nil
}

func parseID(s string, max uint64) (uint64, error) {
	if s == "" || (len(s) > 1 && s[0] == '0') {
		return 0, strconv.ErrSyntax
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, strconv.ErrSyntax
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n > max {
		return 0, strconv.ErrRange
	}
	return n, nil
}

// Path returns the backend directory as XENBUS_PATH names it.
func (b Backend) Path() string { return fmt.Sprintf("backend/vbd/%d/%d", b.Domid, b.Devid) }

func (b Backend) node(name string) string { return b.Path() + "/" + name }

func (b Backend) String() string { return b.Path() }

// Store is the XenStore access the contract needs. ClientStore adapts a
// *xenstore.Client; tests may use an in-memory map.
type Store interface {
	Batcher
	Directory(ctx context.Context, path string) ([]string, error)
	// Transact runs fn in one transaction, retrying on EAGAIN.
	Transact(ctx context.Context, fn func(tx Batcher) error) error
}

// Batcher sends operations back to back and returns their replies in order
// (xenstore.Client.Batch): a batch costs one round trip.
type Batcher interface {
	Batch(ctx context.Context, ops []xenstore.Op) []xenstore.Reply
}

// ClientStore is a Store on a real XenStore connection.
type ClientStore struct{ *xenstore.Client }

func (s ClientStore) Transact(ctx context.Context, fn func(tx Batcher) error) error {
	return s.Client.Transaction(ctx, func(tx *xenstore.Tx) error { return fn(tx) })
}

// read is a batch of one read.
func read(ctx context.Context, s Batcher, path string) (string, error) {
	r := s.Batch(ctx, []xenstore.Op{xenstore.Read(path)})[0]
	return r.Value, r.Err
}

// Node names one node of a backend directory a decision may need; a set of
// them is a mask.
type Node uint16

const (
	Script         Node = 1 << iota // the script libxl execs (absolute path)
	State                           // the backend's xenbus state (blkback writes it)
	Params                          // the disk's target
	Mode                            // r, w or w!
	PhysicalDevice                  // major:minor in hex, as blkback reads it
	DiskSeq                         // our loop device's diskseq, in hex
	StockNode                       // "node": the stock block script's loop device
	HotplugError                    // a failure recorded for libxl
	Dir                             // the directory itself: whether the backend exists
	numNodes       = iota
)

// nodeNames are the nodes' names in the backend directory ("" for Dir).
var nodeNames = [numNodes]string{nameScript, nameState, nameParams, nameMode, namePhysicalDevice, nameDiskSeq, nameStockNode, nameHotplugError, ""}

// The names of the backend's nodes, in one place: the snapshot reads them,
// Connect, Fail and Disconnect write them, and the watch (tree.go) tells
// them apart.
const (
	nameScript             = "script"
	nameState              = "state"
	nameParams             = "params"
	nameMode               = "mode"
	namePhysicalDevice     = "physical-device"
	namePhysicalDevicePath = "physical-device-path"
	nameDiskSeq            = "diskseq"
	nameStockNode          = "node"
	nameHotplugError       = "hotplug-error"
	nameHotplugStatus      = "hotplug-status"
)

// Snapshot is what one batch read of a backend's nodes found: the input of
// every decision the daemon makes about the backend.
type Snapshot struct {
	Backend Backend
	Read    Node // the nodes asked for
	Present Node // those of them that exist
	values  [numNodes]string
	Err     error // the first read that failed other than with ENOENT (XenStore trouble)
	// Also are the replies to the caller's own reads that went in the
	// snapshot's batch (ReadSnapshot's also), in order.
	Also []xenstore.Reply
}

// ReadSnapshot reads the nodes of b in one batch (one round trip). also are
// more reads of the caller's, sent in the same batch so that they cost no
// round trip of their own; their replies are in Snapshot.Also.
func ReadSnapshot(ctx context.Context, s Batcher, b Backend, nodes Node, also ...xenstore.Op) Snapshot {
	snap := Snapshot{Backend: b, Read: nodes}
	var ops []xenstore.Op
	var which []int
	for i := range numNodes {
		if nodes&(1<<i) != 0 {
			p := b.Path()
			if nodeNames[i] != "" {
				p = b.node(nodeNames[i])
			}
			ops = append(ops, xenstore.Read(p))
			which = append(which, i)
		}
	}
	replies := s.Batch(ctx, append(ops, also...))
	snap.Also = replies[len(ops):]
	for k, r := range replies[:len(ops)] {
		i := which[k]
		switch {
		case r.Err == nil:
			snap.Present |= 1 << i
			snap.values[i] = r.Value
		case !errors.Is(r.Err, unix.ENOENT) && snap.Err == nil:
			snap.Err = readError(ops[k].Path, r.Err)
		}
	}
	return snap
}

// SnapshotOf is the snapshot a read of the nodes read would return when the
// nodes in present exist with those values and other reads fail with err
// (nil: ENOENT): for fakes and table tests.
func SnapshotOf(b Backend, read Node, present map[Node]string, err error) Snapshot {
	s := Snapshot{Backend: b, Read: read, Err: err}
	for i := range numNodes {
		n := Node(1) << i
		if v, ok := present[n]; ok && read&n != 0 {
			s.Present |= n
			s.values[i] = v
		}
	}
	return s
}

// Has reports whether node n was read and exists.
func (s Snapshot) Has(n Node) bool { return s.Present&n != 0 }

// Value returns node n's value ("" if absent or not read).
func (s Snapshot) Value(n Node) string {
	for i := range numNodes {
		if n == 1<<i {
			return s.values[i]
		}
	}
	return ""
}

// Gone reports whether the backend directory was read and does not exist.
func (s Snapshot) Gone() bool { return s.Read&Dir != 0 && s.Present&Dir == 0 && s.Err == nil }

// Request is what the backend asks for.
type Request struct {
	Params string
	Mode   string
}

// Request checks params and mode (read in s) and returns them, or an error a
// Xen administrator can act on.
func (s Snapshot) Request() (Request, error) {
	if s.Err != nil {
		return Request{}, s.Err
	}
	var r Request
	var err error
	if r.Params, err = checkRequired(s.Backend, nameParams, s.Value(Params), s.Has(Params), MaxParams); err != nil {
		return Request{}, err
	}
	if r.Mode, err = checkRequired(s.Backend, nameMode, s.Value(Mode), s.Has(Mode), MaxMode); err != nil {
		return Request{}, err
	}
	return r, nil
}

// checkRequired checks the value v (present: the node exists) of a node add needs.
func checkRequired(b Backend, name, v string, present bool, max int) (string, error) {
	switch {
	case !present:
		return "", fmt.Errorf("%s is missing in %s: the toolstack did not write the disk's %s", name, b, name)
	case v == "":
		return "", fmt.Errorf("%s is empty in %s: set the disk's target in the domain configuration", name, b)
	case len(v) > max:
		return "", fmt.Errorf("%s in %s is %d bytes long (%q); the limit is %d", name, b, len(v), text.Truncate(v, 64), max)
	}
	return v, nil
}

// readError explains a failed read: an error reply names the node; a
// transport failure (dial refused, connection lost) means xenstored is down.
func readError(path string, err error) error {
	var xerr *xenstore.Error
	reply := errors.As(err, &xerr) && xerr.Op != "dial" &&
		!errors.Is(err, xenstore.ErrConnectionLost) && !errors.Is(err, xenstore.ErrClosed)
	if reply {
		return fmt.Errorf("read %s: %w", path, err)
	}
	return fmt.Errorf("cannot reach XenStore to read %s (is xenstored running?): %w", path, err)
}

// Result is what add hands to blkback.
type Result struct {
	// Request is what the device was made for, as the caller's snapshot
	// read it: Connect writes nothing if params or mode now say otherwise.
	Request    Request
	Rdev       uint64 // physical-device
	DevPath    string // physical-device-path
	DiskSeq    uint64 // 0: not a loop device, no diskseq node
	ClearError bool   // hotplug-error is set (an earlier failed add): remove it
}

// FormatRdev formats a device number as blkback parses it: "%x:%x".
func FormatRdev(rdev uint64) string {
	return fmt.Sprintf("%x:%x", unix.Major(rdev), unix.Minor(rdev))
}

// ParseRdev parses physical-device as FormatRdev writes it.
func ParseRdev(s string) (uint64, error) {
	maj, min, ok := strings.Cut(s, ":")
	a, err1 := strconv.ParseUint(maj, 16, 32)
	b, err2 := strconv.ParseUint(min, 16, 32)
	if !ok || err1 != nil || err2 != nil {
		return 0, fmt.Errorf("physical-device %q is not major:minor in hex", text.Truncate(s, 64))
	}
	return unix.Mkdev(uint32(a), uint32(b)), nil
}

// FormatDiskSeq and ParseDiskSeq are the diskseq node's format (hex).
func FormatDiskSeq(seq uint64) string { return strconv.FormatUint(seq, 16) }

func ParseDiskSeq(s string) (uint64, error) { return strconv.ParseUint(s, 16, 64) }

// ErrBackendGone: the backend directory was removed (the domain is being
// destroyed); nothing was written.
var ErrBackendGone = errors.New("backend directory is gone")

// ErrBackendChanged: the backend directory now asks for another disk than
// the one the result was made for (removed and written again by libxl
// meanwhile); nothing was written.
var ErrBackendChanged = errors.New("backend directory was re-created for another disk")

// ErrPhysicalDeviceSet: physical-device already holds another device;
// blkback ignores changes, so it is never rewritten.
var ErrPhysicalDeviceSet = errors.New("physical-device already set to another device")

// Connect writes the result in one transaction: physical-device,
// physical-device-path, diskseq (loop devices) and hotplug-status=connected,
// and removes hotplug-error if r says it is set. It writes nothing if the
// backend is gone, if its params or mode are no longer r.Request (the
// directory was removed and written again for another disk while the device
// was made: the device is not that disk's), or if physical-device already
// names another device. The checks (the directory, params, mode,
// physical-device) and the writes go out in one batch: the writes are
// speculative, and the transaction is aborted, taking them back, if a check
// fails. Three round trips: start, the batch, end. also are more reads of the
// caller's, sent in the same batch (no round trip of their own); their
// replies are returned, in order.
func Connect(ctx context.Context, s Store, b Backend, r Result, also ...xenstore.Op) ([]xenstore.Reply, error) {
	pdev := FormatRdev(r.Rdev)
	var alsoReplies []xenstore.Reply
	err := s.Transact(ctx, func(tx Batcher) error {
		ops := []xenstore.Op{xenstore.Read(b.Path()), xenstore.Read(b.node(namePhysicalDevice)),
			xenstore.Read(b.node(nameParams)), xenstore.Read(b.node(nameMode)),
			xenstore.Write(b.node(namePhysicalDevice), pdev), xenstore.Write(b.node(namePhysicalDevicePath), r.DevPath)}
		if r.DiskSeq != 0 {
			ops = append(ops, xenstore.Write(b.node(nameDiskSeq), FormatDiskSeq(r.DiskSeq)))
		}
		ops = append(ops, xenstore.Write(b.node(nameHotplugStatus), "connected"))
		if r.ClearError {
			ops = append(ops, xenstore.Rm(b.node(nameHotplugError)))
		}
		writes := len(ops)
		replies := tx.Batch(ctx, append(ops, also...))
		alsoReplies = replies[writes:]
		if err := existsError(b, replies[0].Err); err != nil {
			return err
		}
		if err := firstError(replies[2:4]); err != nil {
			return err
		}
		if now := (Request{Params: replies[2].Value, Mode: replies[3].Value}); replies[2].Err != nil || replies[3].Err != nil || now != r.Request {
			return fmt.Errorf("%w: params %q mode %q, the device was made for params %q mode %q", ErrBackendChanged,
				text.Truncate(now.Params, 200), text.Truncate(now.Mode, 16), text.Truncate(r.Request.Params, 200), text.Truncate(r.Request.Mode, 16))
		}
		switch old, err := replies[1].Value, replies[1].Err; {
		case err == nil && old != pdev:
			return fmt.Errorf("%w: %s holds %q, this add made %s", ErrPhysicalDeviceSet, b.node(namePhysicalDevice), text.Truncate(old, 64), pdev)
		case err != nil && !errors.Is(err, unix.ENOENT):
			return err
		}
		return firstError(replies[4:writes])
	})
	if err != nil {
		return alsoReplies, fmt.Errorf("write physical-device %s to %s: %w", pdev, b, err)
	}
	return alsoReplies, nil
}

// firstError returns the first failure among replies (ENOENT of an rm is none).
func firstError(replies []xenstore.Reply) error {
	for _, r := range replies {
		if r.Err != nil && !errors.Is(r.Err, unix.ENOENT) {
			return r.Err
		}
	}
	return nil
}

// Fail records msg in hotplug-error (libxl logs it) and sets
// hotplug-status=error, unless the backend directory is gone: writing into it
// would recreate it (the speculative writes are then aborted with the
// transaction).
func Fail(ctx context.Context, s Store, b Backend, msg string) error {
	msg = text.Truncate(msg, maxError)
	err := s.Transact(ctx, func(tx Batcher) error {
		replies := tx.Batch(ctx, []xenstore.Op{xenstore.Read(b.Path()),
			xenstore.Write(b.node(nameHotplugError), msg), xenstore.Write(b.node(nameHotplugStatus), "error")})
		if err := existsError(b, replies[0].Err); err != nil {
			return err
		}
		return firstError(replies[1:])
	})
	if err != nil {
		return fmt.Errorf("write hotplug-error to %s: %w", b, err)
	}
	return nil
}

// RecordDiskSeq writes diskseq (hex) for a device adopted after the fact (the
// stock block script's loop device), only while physical-device still is
// pdev: a backend removed or re-attached meanwhile is left alone.
func RecordDiskSeq(ctx context.Context, s Store, b Backend, pdev string, diskseq uint64) error {
	err := s.Transact(ctx, func(tx Batcher) error {
		replies := tx.Batch(ctx, []xenstore.Op{xenstore.Read(b.node(namePhysicalDevice)),
			xenstore.Write(b.node(nameDiskSeq), FormatDiskSeq(diskseq))})
		old, err := replies[0].Value, replies[0].Err
		switch {
		case errors.Is(err, unix.ENOENT):
			return fmt.Errorf("%w: %s", ErrBackendGone, b)
		case err != nil:
			return err
		case old != pdev:
			return fmt.Errorf("%w: %s holds %q, not %s", ErrPhysicalDeviceSet, b.node(namePhysicalDevice), text.Truncate(old, 64), pdev)
		}
		return replies[1].Err
	})
	if err != nil {
		return fmt.Errorf("write diskseq to %s: %w", b, err)
	}
	return nil
}

// Disconnect removes physical-device, then diskseq, in one batch (one round
// trip, no transaction): xenstored applies one connection's requests in
// order, so at no moment does diskseq go before physical-device. A node that
// is already gone, or a backend directory that is, is not an error.
func Disconnect(ctx context.Context, s Store, b Backend) error {
	replies := s.Batch(ctx, []xenstore.Op{xenstore.Rm(b.node(namePhysicalDevice)), xenstore.Rm(b.node(nameDiskSeq))})
	if err := firstError(replies); err != nil {
		return fmt.Errorf("remove physical-device from %s: %w", b, err)
	}
	return nil
}

// existsError is the verdict on the read of b's directory.
func existsError(b Backend, err error) error {
	if errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("%w: %s", ErrBackendGone, b)
	}
	return err
}
