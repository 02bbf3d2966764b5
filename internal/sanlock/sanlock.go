// Package sanlock is a client for the sanlock daemon's unix socket: joining a
// lockspace, initialising resource leases on disk, and acquiring, converting,
// inquiring and releasing them for the calling process. It speaks the wire
// protocol of sanlock 3.x (sm_header + the packed C structs of sanlock.h)
// itself, so the daemon stays static (no libsanlock, no cgo), and holds no
// policy: which resources to take and when is the caller's (internal/lease).
//
// Requests that are not tied to a process (lockspaces, write_resource,
// read_resource_owners, get_hosts) each use a connection of their own, as
// libsanlock does. Leases belong to a registered Process: sanlock ties them to
// the registering connection and to its peer's pid, and frees them (or keeps
// persistent ones as orphans) when that connection closes.
package sanlock

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// DefaultDir is the sanlock daemon's run directory; SANLOCK_RUN_DIR moves it.
const DefaultDir = "/run/sanlock"

// Limits of sanlock's structs.
const (
	NameLen = 48   // SANLK_NAME_LEN: lockspace and resource names
	PathLen = 1024 // SANLK_PATH_LEN, terminating NUL included
)

// Commands (sanlock_sock.h SM_CMD_*).
const (
	cmdRegister           = 1
	cmdAddLockspace       = 2
	cmdRemLockspace       = 3
	cmdAcquire            = 7
	cmdRelease            = 8
	cmdInquire            = 9
	cmdRestrict           = 10
	cmdInqLockspace       = 16
	cmdWriteLockspace     = 18
	cmdWriteResource      = 19
	cmdReadLockspace      = 20
	cmdGetHosts           = 23
	cmdReadResourceOwners = 24
	cmdConvert            = 27
	cmdVersion            = 28
)

const (
	smMagic = 0x04282010
	smProto = 0x00000001

	headerSize    = 32
	diskSize      = PathLen + 16  // sanlk_disk
	lockspaceSize = 64 + diskSize // sanlk_lockspace: name, host_id, flags, pad, disk
	resourceSize  = 128           // sanlk_resource without its disks
	optionsSize   = NameLen + 8   // sanlk_options without its string
	hostSize      = 32            // sanlk_host
	maxReply      = 1 << 20       // MAX_CLIENT_MSG
	pidSelf       = 0xffffffff    // data2 = -1: the registered connection's own pid
)

// Resource flags (SANLK_RES_*).
const (
	ResShared     = 0x4 // a shared (read) lease; without it, exclusive
	ResPersistent = 0x8 // kept as an orphan when its process exits
)

// Acquire flags (SANLK_ACQUIRE_*).
const (
	AcquireOrphan      = 0x2 // adopt the orphan of this name if there is one, else acquire as usual
	AcquireOrphanOnly  = 0x4 // adopt the orphan, or fail with ENOENT
	AcquireOwnerNoWait = 0x8 // fail with ErrOwnedRetry instead of waiting for a dead owner's lease to expire
)

// Release flags (SANLK_REL_*).
const (
	ReleaseOrphan = 0x4 // release orphans (of one name, or all in the lockspace when the name is empty)
)

// Restrict flags (SANLK_RESTRICT_*).
const (
	RestrictSigkill = 0x2 // sanlock never SIGKILLs the process when its lockspace fails
	RestrictSigterm = 0x4 // nor SIGTERMs it
)

// Host states (sanlk_host.flags & SANLK_HOST_MASK).
const (
	HostUnknown = 1
	HostFree    = 2
	HostLive    = 3
	HostFail    = 4
	HostDead    = 5
)

// Disk is a location on shared storage: a file or block device and an offset.
type Disk struct {
	Path   string
	Offset uint64
}

// Lockspace names a lockspace and this host's id in it.
type Lockspace struct {
	Name   string
	HostID uint64
	Disk   Disk
}

// Resource names a resource lease: its lockspace, its name and where it lives.
type Resource struct {
	Lockspace string
	Name      string
	Disk      Disk
	Flags     uint32 // ResShared, ResPersistent
}

// Host is one host's state in a lockspace, or one owner of a resource.
type Host struct {
	ID         uint64
	Generation uint64
	Timestamp  uint64
	IOTimeout  uint32
	Flags      uint32
}

// State is the host's liveness as sanlock judges it (HostLive, HostDead, ...).
func (h Host) State() uint32 { return h.Flags & 0xf }

// Client talks to one sanlock daemon through the socket in Dir.
type Client struct {
	Dir string // the daemon's run directory (holds sanlock.sock); "" is DefaultDir
}

func (c Client) socket() string {
	dir := c.Dir
	if dir == "" {
		dir = DefaultDir
	}
	return filepath.Join(dir, "sanlock.sock")
}

// dialRetry bounds how long a connect is retried while the daemon's listen
// backlog is full.
const dialRetry = 5 * time.Second

func (c Client) dial(ctx context.Context) (*net.UnixConn, error) {
	var d net.Dialer
	deadline := time.Now().Add(dialRetry)
	for wait := time.Millisecond; ; wait = min(2*wait, 50*time.Millisecond) {
		conn, err := d.DialContext(ctx, "unix", c.socket())
		if err == nil {
			return conn.(*net.UnixConn), nil
		}
		// sanlock listens with a small backlog: concurrent requests (each
		// on a connection of its own) find it full, and a unix socket's
		// connect then fails with EAGAIN instead of waiting.
		if !errors.Is(err, syscall.EAGAIN) || time.Now().After(deadline) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(wait):
		}
	}
}

// call sends one request on a connection of its own and reads the reply's
// header and up to len(extra) more bytes; it returns the header.
func (c Client) call(ctx context.Context, op string, cmd, flags, data, data2 uint32, body []byte) (header, []byte, error) {
	conn, err := c.dial(ctx)
	if err != nil {
		return header{}, nil, &Error{Op: op, Err: err}
	}
	defer conn.Close()
	return roundTrip(ctx, conn, op, cmd, flags, data, data2, body)
}

func roundTrip(ctx context.Context, conn *net.UnixConn, op string, cmd, flags, data, data2 uint32, body []byte) (header, []byte, error) {
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := send(conn, cmd, flags, data, data2, body); err != nil {
		return header{}, nil, wrapCtx(ctx, op, err)
	}
	h, rest, err := recv(conn)
	if err != nil {
		return header{}, nil, wrapCtx(ctx, op, err)
	}
	if int32(h.data) < 0 {
		return h, rest, &Error{Op: op, Code: int32(h.data)}
	}
	return h, rest, nil
}

func wrapCtx(ctx context.Context, op string, err error) error {
	if ctx.Err() != nil {
		err = ctx.Err()
	}
	return &Error{Op: op, Err: err}
}

type header struct {
	cmd, flags, length, seq, data, data2 uint32
}

func send(conn *net.UnixConn, cmd, flags, data, data2 uint32, body []byte) error {
	b := make([]byte, headerSize, headerSize+len(body))
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], smMagic)
	ne.PutUint32(b[4:], smProto)
	ne.PutUint32(b[8:], cmd)
	ne.PutUint32(b[12:], flags)
	ne.PutUint32(b[16:], uint32(headerSize+len(body)))
	ne.PutUint32(b[24:], data)
	ne.PutUint32(b[28:], data2)
	b = append(b, body...)
	_, err := conn.Write(b)
	return err
}

// recv reads one reply: a header, then length-32 bytes of payload.
func recv(conn io.Reader) (header, []byte, error) {
	var b [headerSize]byte
	if _, err := io.ReadFull(conn, b[:]); err != nil {
		return header{}, nil, fmt.Errorf("read reply: %w", err)
	}
	ne := binary.NativeEndian
	if m := ne.Uint32(b[0:]); m != smMagic {
		return header{}, nil, fmt.Errorf("reply with bad magic %#x", m)
	}
	h := header{cmd: ne.Uint32(b[8:]), flags: ne.Uint32(b[12:]), length: ne.Uint32(b[16:]),
		seq: ne.Uint32(b[20:]), data: ne.Uint32(b[24:]), data2: ne.Uint32(b[28:])}
	if h.length < headerSize || h.length > maxReply {
		return header{}, nil, fmt.Errorf("reply of bad length %d", h.length)
	}
	rest := make([]byte, h.length-headerSize)
	if _, err := io.ReadFull(conn, rest); err != nil {
		return header{}, nil, fmt.Errorf("read reply payload: %w", err)
	}
	return h, rest, nil
}

// putName copies a name into a fixed field; sanlock needs no terminating NUL
// when the name fills it.
func putName(dst []byte, name string) error {
	if len(name) > len(dst) || strings.IndexByte(name, 0) >= 0 {
		return fmt.Errorf("name %q: longer than %d bytes or has a NUL", name, len(dst))
	}
	copy(dst, name)
	return nil
}

func putDisk(dst []byte, d Disk) error {
	// sanlock escapes ':' and ' ' in paths it parses from strings
	// (sanlock_path_export); a path with them could be read differently by
	// the daemon's tools, so it is refused rather than escaped.
	if len(d.Path) >= PathLen || strings.ContainsAny(d.Path, ": \\\x00") {
		return fmt.Errorf("disk path %q: too long, or has ':', ' ', '\\' or NUL", d.Path)
	}
	copy(dst, d.Path)
	binary.NativeEndian.PutUint64(dst[PathLen:], d.Offset)
	return nil
}

func (ls Lockspace) marshal() ([]byte, error) {
	b := make([]byte, lockspaceSize)
	if err := putName(b[:NameLen], ls.Name); err != nil {
		return nil, fmt.Errorf("lockspace: %w", err)
	}
	binary.NativeEndian.PutUint64(b[48:], ls.HostID)
	if err := putDisk(b[64:], ls.Disk); err != nil {
		return nil, fmt.Errorf("lockspace %s: %w", ls.Name, err)
	}
	return b, nil
}

// marshal encodes the resource with its one disk (withDisk) or without
// (release and convert send the bare struct, as libsanlock does).
func (r Resource) marshal(withDisk bool) ([]byte, error) {
	n := resourceSize
	if withDisk {
		n += diskSize
	}
	b := make([]byte, n)
	if err := putName(b[:NameLen], r.Lockspace); err != nil {
		return nil, fmt.Errorf("resource lockspace: %w", err)
	}
	if err := putName(b[NameLen:2*NameLen], r.Name); err != nil {
		return nil, fmt.Errorf("resource: %w", err)
	}
	ne := binary.NativeEndian
	ne.PutUint32(b[120:], r.Flags)
	if withDisk {
		ne.PutUint32(b[124:], 1)
		if err := putDisk(b[resourceSize:], r.Disk); err != nil {
			return nil, fmt.Errorf("resource %s: %w", r.Name, err)
		}
	}
	return b, nil
}

func unmarshalHosts(b []byte, n uint32) ([]Host, error) {
	if uint64(len(b)) < uint64(n)*hostSize {
		return nil, fmt.Errorf("reply names %d hosts in %d bytes", n, len(b))
	}
	ne := binary.NativeEndian
	hosts := make([]Host, n)
	for i := range hosts {
		h := b[i*hostSize:]
		hosts[i] = Host{ID: ne.Uint64(h[0:]), Generation: ne.Uint64(h[8:]), Timestamp: ne.Uint64(h[16:]),
			IOTimeout: ne.Uint32(h[24:]), Flags: ne.Uint32(h[28:])}
	}
	return hosts, nil
}

// WriteLockspace initialises a lockspace on disk (sanlock client init -s):
// every host's delta lease free. ioTimeout 0 is sanlock's default (10 s).
func (c Client) WriteLockspace(ctx context.Context, ls Lockspace, ioTimeout uint32) error {
	body, err := ls.marshal()
	if err != nil {
		return &Error{Op: "write_lockspace", Err: err}
	}
	_, _, err = c.call(ctx, "write_lockspace "+ls.Name, cmdWriteLockspace, 0, 0, ioTimeout, body)
	return err
}

// AddLockspace joins this host to the lockspace under ls.HostID. It returns
// once the host id's delta lease is held: at least 2*io_timeout of the
// lockspace (20 s by default), longer if the id was held by another host.
// ioTimeout 0 takes the daemon's.
func (c Client) AddLockspace(ctx context.Context, ls Lockspace, ioTimeout uint32) error {
	body, err := ls.marshal()
	if err != nil {
		return &Error{Op: "add_lockspace", Err: err}
	}
	_, _, err = c.call(ctx, "add_lockspace "+ls.Name, cmdAddLockspace, 0, ioTimeout, 0, body)
	return err
}

// InqLockspace reports whether this host is in the lockspace: nil when it
// is, an error matching syscall.ENOENT when not, syscall.EINPROGRESS while
// an add or remove is under way.
func (c Client) InqLockspace(ctx context.Context, ls Lockspace) error {
	body, err := ls.marshal()
	if err != nil {
		return &Error{Op: "inq_lockspace", Err: err}
	}
	_, _, err = c.call(ctx, "inq_lockspace "+ls.Name, cmdInqLockspace, 0, 0, 0, body)
	return err
}

// ReadLockspace reads the lockspace's io_timeout (seconds) from its disk:
// the one it was initialised with, which every host should join with.
func (c Client) ReadLockspace(ctx context.Context, ls Lockspace) (ioTimeout uint32, err error) {
	body, err := ls.marshal()
	if err != nil {
		return 0, &Error{Op: "read_lockspace", Err: err}
	}
	h, _, err := c.call(ctx, "read_lockspace "+ls.Name, cmdReadLockspace, 0, 0, 0, body)
	if err != nil {
		return 0, err
	}
	return h.data2, nil
}

// RemLockspace leaves the lockspace (it fails while leases in it are held).
func (c Client) RemLockspace(ctx context.Context, ls Lockspace) error {
	body, err := ls.marshal()
	if err != nil {
		return &Error{Op: "rem_lockspace", Err: err}
	}
	_, _, err = c.call(ctx, "rem_lockspace "+ls.Name, cmdRemLockspace, 0, 0, 0, body)
	return err
}

// WriteResource initialises a resource lease on disk (sanlock client init
// -r): free, with room for sanlock's default number of hosts (1 MiB).
func (c Client) WriteResource(ctx context.Context, r Resource) error {
	body, err := r.marshal(true)
	if err != nil {
		return &Error{Op: "write_resource", Err: err}
	}
	_, _, err = c.call(ctx, "write_resource "+r.Name, cmdWriteResource, 0, 0, 0, body)
	return err
}

// ReadResourceOwners reads, from disk, the hosts that hold the resource
// (the exclusive owner, or every shared holder).
func (c Client) ReadResourceOwners(ctx context.Context, r Resource) ([]Host, error) {
	body, err := r.marshal(true)
	if err != nil {
		return nil, &Error{Op: "read_resource_owners", Err: err}
	}
	h, rest, err := c.call(ctx, "read_resource_owners "+r.Name, cmdReadResourceOwners, 0, 0, 0, body)
	if err != nil {
		return nil, err
	}
	if len(rest) < resourceSize {
		return nil, &Error{Op: "read_resource_owners " + r.Name, Err: errors.New("short reply")}
	}
	hosts, err := unmarshalHosts(rest[resourceSize:], h.data2)
	if err != nil {
		return nil, &Error{Op: "read_resource_owners " + r.Name, Err: err}
	}
	return hosts, nil
}

// Hosts returns the lockspace's hosts as this daemon sees them (all of
// them for hostID 0), with their liveness.
func (c Client) Hosts(ctx context.Context, lockspace string, hostID uint64) ([]Host, error) {
	body, err := Lockspace{Name: lockspace, HostID: hostID}.marshal()
	if err != nil {
		return nil, &Error{Op: "get_hosts", Err: err}
	}
	h, rest, err := c.call(ctx, "get_hosts "+lockspace, cmdGetHosts, 0, 0, 0, body)
	if err != nil && !errors.Is(err, syscall.ENOSPC) { // ENOSPC: the list was cut short
		return nil, err
	}
	hosts, err := unmarshalHosts(rest, h.data2)
	if err != nil {
		return nil, &Error{Op: "get_hosts " + lockspace, Err: err}
	}
	return hosts, nil
}

// Version returns the daemon's version (major<<24 | minor<<16 | patch<<8).
func (c Client) Version(ctx context.Context) (uint32, error) {
	h, _, err := c.call(ctx, "version", cmdVersion, 0, 0, 0, nil)
	if err != nil {
		return 0, err
	}
	return h.data2, nil
}
