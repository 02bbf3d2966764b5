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
	"sync"

	"golang.org/x/sys/unix"

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
		return Backend{}, fmt.Errorf("%w %q: want backend/vbd/<domid>/<devid>", ErrBadPath, quote(p))
	}
	domid, err1 := parseID(parts[2], 0x7fef) // DOMID_FIRST_RESERVED-1
	devid, err2 := parseID(parts[3], 1<<32-1)
	if err1 != nil || err2 != nil {
		return Backend{}, fmt.Errorf("%w %q: domid and devid must be decimal numbers", ErrBadPath, quote(p))
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
// *xenstore.Client; tests may use an in-memory map. Reads, and the operations
// of one transaction, may be issued concurrently (the client pipelines them).
type Store interface {
	Read(ctx context.Context, path string) (string, error)
	GetPerms(ctx context.Context, path string) ([]xenstore.Perm, error)
	// Transact runs fn in one transaction, retrying on EAGAIN.
	Transact(ctx context.Context, fn func(ops xenstore.Ops) error) error
}

// ClientStore is a Store on a real XenStore connection.
type ClientStore struct{ *xenstore.Client }

func (s ClientStore) Transact(ctx context.Context, fn func(ops xenstore.Ops) error) error {
	return s.Client.Transaction(ctx, func(tx *xenstore.Tx) error { return fn(tx) })
}

// Request is what the backend asks for.
type Request struct {
	Params         string
	Mode           string
	PhysicalDevice string // already written (by an earlier add): "" if absent
	Frontend       Frontend
}

// ReadRequest reads params, mode and physical-device and checks their sizes,
// and reads what the toolstack says about the frontend domain (Frontend).
// The reads are issued at once: the XenStore client pipelines them, so they
// cost one round trip (two for a stub domain) instead of seven.
func ReadRequest(ctx context.Context, s Store, b Backend) (Request, error) {
	names := [...]string{"params", "mode", "physical-device"}
	var vals [len(names)]string
	var errs [len(names)]error
	var wg sync.WaitGroup
	for i, name := range names {
		wg.Go(func() { vals[i], errs[i] = s.Read(ctx, b.node(name)) })
	}
	var fe Frontend
	wg.Go(func() { fe = readFrontend(ctx, s, b.Domid) })
	wg.Wait()
	r := Request{Frontend: fe}
	var err error
	if r.Params, err = checkRequired(b, "params", vals[0], errs[0], MaxParams); err != nil {
		return Request{}, err
	}
	if r.Mode, err = checkRequired(b, "mode", vals[1], errs[1], MaxMode); err != nil {
		return Request{}, err
	}
	r.PhysicalDevice, err = vals[2], errs[2]
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return Request{}, readError(b.node("physical-device"), err)
	}
	return r, nil
}

// ToolstackDomid is the domain whose nodes are trusted to say which VM a
// domain belongs to: the toolstack (libxl) runs in dom0.
const ToolstackDomid = 0

// Frontend is what the toolstack says about a frontend domain, for the
// same-VM and stub-domain sharing exceptions. Each value is read only from a
// node whose permissions let no one but the toolstack write it; a missing
// node, an unreadable one or one a guest could write leaves its value "" (and
// a line in Ignored or Unreadable), so it can never widen sharing.
type Frontend struct {
	VM         string   // /local/domain/<domid>/vm
	Target     int      // a device-model stub domain: the domain it serves (/local/domain/<domid>/target); -1 if none
	TargetVM   string   // /local/domain/<Target>/vm
	Ignored    []string // nodes that exist but were not trusted, and why
	Unreadable []string // nodes that could not be read (e.g. EACCES in a driver domain), and why
}

// readFrontend reads domid's vm and target nodes and their permissions, then
// the target's vm (each value with its permissions, pipelined).
func readFrontend(ctx context.Context, s Store, domid uint32) Frontend {
	fe := Frontend{Target: -1}
	dom := fmt.Sprintf("/local/domain/%d", domid)
	var vm, target string
	var wg sync.WaitGroup
	var vmWhy, targetWhy string
	var vmErr, targetErr bool
	wg.Go(func() { vm, vmWhy, vmErr = readTrusted(ctx, s, dom+"/vm") })
	wg.Go(func() { target, targetWhy, targetErr = readTrusted(ctx, s, dom+"/target") })
	wg.Wait()
	fe.VM = vm
	fe.note(vmWhy, vmErr)
	fe.note(targetWhy, targetErr)
	if target == "" {
		return fe
	}
	t, err := parseID(target, 0x7fef)
	if err != nil || t == uint64(domid) {
		fe.addIgnored(fmt.Sprintf("%s/target: %q is not another domain's id", dom, quote(target)))
		return fe
	}
	fe.Target = int(t)
	tvm, why, readErr := readTrusted(ctx, s, fmt.Sprintf("/local/domain/%d/vm", t))
	fe.TargetVM = tvm
	fe.note(why, readErr)
	return fe
}

func (fe *Frontend) addIgnored(why string) { fe.note(why, false) }

func (fe *Frontend) note(why string, readErr bool) {
	switch {
	case why == "":
	case readErr:
		fe.Unreadable = append(fe.Unreadable, why)
	default:
		fe.Ignored = append(fe.Ignored, why)
	}
}

// readTrusted returns path's value if only the toolstack can write it ("" and
// why not otherwise, readErr if the node could not be read; "" and "" if the
// node is simply missing).
func readTrusted(ctx context.Context, s Store, path string) (value, why string, readErr bool) {
	var v string
	var perms []xenstore.Perm
	var rerr, perr error
	var wg sync.WaitGroup
	wg.Go(func() { v, rerr = s.Read(ctx, path) })
	wg.Go(func() { perms, perr = s.GetPerms(ctx, path) })
	wg.Wait()
	switch {
	case errors.Is(rerr, unix.ENOENT) || errors.Is(perr, unix.ENOENT):
		return "", "", false
	case rerr != nil:
		return "", fmt.Sprintf("%s: %v", path, rerr), true
	case perr != nil:
		return "", fmt.Sprintf("%s: %v", path, perr), true
	case v == "":
		return "", fmt.Sprintf("%s: empty", path), false
	}
	if why := untrusted(perms); why != "" {
		return "", fmt.Sprintf("%s: %s", path, why), false
	}
	return v, "", false
}

// untrusted says why a node with permissions perms might have been written by
// someone other than the toolstack ("" if it cannot). The first entry is the
// owner (who may always write) and everyone's default access.
func untrusted(perms []xenstore.Perm) string {
	if len(perms) == 0 {
		return "no permissions returned"
	}
	if perms[0].Domid != ToolstackDomid {
		return fmt.Sprintf("owned by domain %d, not the toolstack (domain %d)", perms[0].Domid, ToolstackDomid)
	}
	if a := perms[0].Access; a == 'w' || a == 'b' {
		return fmt.Sprintf("every domain may write it (default access %q)", a)
	}
	for _, p := range perms[1:] {
		if p.Domid != ToolstackDomid && (p.Access == 'w' || p.Access == 'b') {
			return fmt.Sprintf("domain %d may write it", p.Domid)
		}
	}
	return ""
}

// checkRequired checks the value v (read with err) of a node add needs.
func checkRequired(b Backend, name, v string, err error, max int) (string, error) {
	switch {
	case errors.Is(err, unix.ENOENT):
		return "", fmt.Errorf("%s is missing in %s: the toolstack did not write the disk's %s", name, b, name)
	case err != nil:
		return "", readError(b.node(name), err)
	case v == "":
		return "", fmt.Errorf("%s is empty in %s: set the disk's target in the domain configuration", name, b)
	case len(v) > max:
		return "", fmt.Errorf("%s in %s is %d bytes long (%q); the limit is %d", name, b, len(v), quote(v), max)
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
	Rdev    uint64 // physical-device
	DevPath string // physical-device-path
	DiskSeq uint64 // 0: not a loop device, no diskseq node
}

// FormatRdev formats a device number as blkback parses it: "%x:%x".
func FormatRdev(rdev uint64) string {
	return fmt.Sprintf("%x:%x", unix.Major(rdev), unix.Minor(rdev))
}

// ErrBackendGone: the backend directory was removed (the domain is being
// destroyed); nothing was written.
var ErrBackendGone = errors.New("backend directory is gone")

// ErrPhysicalDeviceSet: physical-device already holds another device;
// blkback ignores changes, so it is never rewritten.
var ErrPhysicalDeviceSet = errors.New("physical-device already set to another device")

// Connect writes the result in one transaction: physical-device,
// physical-device-path, diskseq (loop devices) and hotplug-status=connected,
// and removes a stale hotplug-error. It writes nothing if the backend is gone
// or physical-device already names another device. Inside the transaction
// the reads go out at once, then the writes at once: the XenStore client
// pipelines them, so the transaction costs four round trips, not nine.
func Connect(ctx context.Context, s Store, b Backend, r Result) error {
	pdev := FormatRdev(r.Rdev)
	err := s.Transact(ctx, func(tx xenstore.Ops) error {
		var old string
		var dirErr, oldErr, hotplugErr error
		var wg sync.WaitGroup
		wg.Go(func() { _, dirErr = tx.Read(ctx, b.Path()) })
		wg.Go(func() { old, oldErr = tx.Read(ctx, b.node("physical-device")) })
		wg.Go(func() { _, hotplugErr = tx.Read(ctx, b.node("hotplug-error")) })
		wg.Wait()
		if err := existsError(b, dirErr); err != nil {
			return err
		}
		var writes [][2]string
		switch {
		case oldErr == nil && old != pdev:
			return fmt.Errorf("%w: %s holds %q, this add made %s", ErrPhysicalDeviceSet, b.node("physical-device"), quote(old), pdev)
		case oldErr == nil:
			// Same value: written by an earlier add of ours; confirm the rest.
		case errors.Is(oldErr, unix.ENOENT):
			writes = append(writes, [2]string{b.node("physical-device"), pdev})
		default:
			return oldErr
		}
		rmHotplugError := false
		switch {
		case hotplugErr == nil:
			rmHotplugError = true
		case !errors.Is(hotplugErr, unix.ENOENT):
			return hotplugErr
		}
		writes = append(writes, [2]string{b.node("physical-device-path"), r.DevPath})
		if r.DiskSeq != 0 {
			writes = append(writes, [2]string{b.node("diskseq"), strconv.FormatUint(r.DiskSeq, 16)})
		}
		writes = append(writes, [2]string{b.node("hotplug-status"), "connected"})
		errs := make([]error, len(writes)+1)
		for i, w := range writes {
			wg.Go(func() { errs[i] = tx.Write(ctx, w[0], w[1]) })
		}
		if rmHotplugError {
			wg.Go(func() { errs[len(writes)] = tx.Rm(ctx, b.node("hotplug-error")) })
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("write physical-device %s to %s: %w", pdev, b, err)
	}
	return nil
}

// Fail records msg in hotplug-error (libxl logs it) and sets
// hotplug-status=error, unless the backend directory is gone: writing into it
// would recreate it.
func Fail(ctx context.Context, s Store, b Backend, msg string) error {
	msg = quoteN(msg, maxError)
	err := s.Transact(ctx, func(tx xenstore.Ops) error {
		if err := exists(ctx, tx, b); err != nil {
			return err
		}
		if err := tx.Write(ctx, b.node("hotplug-error"), msg); err != nil {
			return err
		}
		return tx.Write(ctx, b.node("hotplug-status"), "error")
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
	err := s.Transact(ctx, func(tx xenstore.Ops) error {
		old, err := tx.Read(ctx, b.node("physical-device"))
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%w: %s", ErrBackendGone, b)
		}
		if err != nil {
			return err
		}
		if old != pdev {
			return fmt.Errorf("%w: %s holds %q, not %s", ErrPhysicalDeviceSet, b.node("physical-device"), quote(old), pdev)
		}
		return tx.Write(ctx, b.node("diskseq"), strconv.FormatUint(diskseq, 16))
	})
	if err != nil {
		return fmt.Errorf("write diskseq to %s: %w", b, err)
	}
	return nil
}

// Disconnect removes physical-device and diskseq if they still exist, in one
// transaction whose two removals go out at once (the client pipelines them):
// three round trips (begin, the removals, commit) instead of six. A node that
// is already gone, or a backend directory that is, is not an error.
func Disconnect(ctx context.Context, s Store, b Backend) error {
	err := s.Transact(ctx, func(tx xenstore.Ops) error {
		nodes := [...]string{b.node("physical-device"), b.node("diskseq")}
		var errs [len(nodes)]error
		var wg sync.WaitGroup
		for i, node := range nodes {
			wg.Go(func() { errs[i] = tx.Rm(ctx, node) })
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil && !errors.Is(err, unix.ENOENT) {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("remove physical-device from %s: %w", b, err)
	}
	return nil
}

func exists(ctx context.Context, ops xenstore.Ops, b Backend) error {
	_, err := ops.Read(ctx, b.Path())
	return existsError(b, err)
}

// existsError is exists' verdict on the read of b's directory.
func existsError(b Backend, err error) error {
	if errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("%w: %s", ErrBackendGone, b)
	}
	return err
}

func quote(s string) string { return quoteN(s, 64) }

func quoteN(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
