// Package api is the daemon's local API: one newline-terminated JSON request
// per unix stream connection, one newline-terminated JSON reply, then close.
// The client uses raw syscalls (no net package poller): it is small and
// needs no goroutines, as the command-line tools want.
package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultSocket is where the daemon listens unless --socket or
// $XENBLKD_SOCKET say otherwise (the C entry's DEFAULT_SOCKET: a test
// compares them).
const DefaultSocket = "/run/xenblkd/api.sock"

// DefaultEntry is the hotplug entry libxl execs for script=xenblkd (the C
// program, cmd/xenblkd-hotplug).
const DefaultEntry = "/etc/xen/scripts/xenblkd"

// DefaultTag prefixes lo_file_name of every loop device the daemon makes.
const DefaultTag = "xenblkd:"

// How long things may take, all derived from the one limit libxl sets: it
// SIGKILLs a hotplug script that has not exited after HotplugTimeout
// (LIBXL_HOTPLUG_TIMEOUT), and the script's error must reach hotplug-error
// before that.
const (
	HotplugTimeout = 40 * time.Second
	// ReplyTimeout is how long the entries (C and Go) wait for the daemon's
	// reply to an add or remove: the Go entry still has time to write
	// hotplug-error itself. The C entry's REPLY_TIMEOUT_SEC (a test
	// compares them).
	ReplyTimeout = HotplugTimeout - 5*time.Second
	// RequestTimeout bounds the daemon's work on one add or remove (and on
	// one backend of an adoption), so its reply, with the error it wrote to
	// hotplug-error, arrives before the entry stops waiting.
	RequestTimeout = ReplyTimeout - 5*time.Second
)

// Timeout is how long a client waits for the reply to op; 0: as long as it
// takes. An adoption works through every backend of the host, each bounded
// by RequestTimeout: no fixed bound on the whole fits every host.
func Timeout(op string) time.Duration {
	if op == OpAdopt {
		return 0
	}
	return ReplyTimeout
}

// SocketFDName is the FileDescriptorName= of the API socket in
// dist/xenblkd.socket: under socket activation the daemon finds the
// listening socket among the fds systemd passes (the fd store's loop devices
// come with it) by this name.
const SocketFDName = "api"

// MaxRequest bounds one request line, its newline included: the daemon
// reads a request into a buffer of this size and refuses a longer one. The
// longest real request (a remove of domid 32751, devid 2^32-1) is 54 bytes.
const MaxRequest = 4096

// MaxMessage bounds one reply line (status lists every attachment).
const MaxMessage = 1 << 20

// Operations.
const (
	OpAdd    = "add"
	OpRemove = "remove"
	OpStatus = "status"
	// OpAdopt asks the daemon to take over the stock block script's loop
	// devices of backends that are now ours (sent by `xenblkd takeover`).
	OpAdopt = "adopt"
	// OpPing answers OK and does nothing: the daemon's watchdog (and any
	// health check) uses it to prove the accept loop serves.
	OpPing = "ping"
)

// Request is one call: Path is XENBUS_PATH (backend/vbd/<domid>/<devid>).
type Request struct {
	Op   string `json:"op"`
	Path string `json:"path,omitempty"`
}

// Response is the daemon's answer.
type Response struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"` // for the administrator
	// ErrorRecorded: the daemon wrote Error to the backend's hotplug-error.
	// If false on failure, the hotplug entry point writes it itself.
	ErrorRecorded bool         `json:"error_recorded,omitempty"`
	Attachment    *Attachment  `json:"attachment,omitempty"`  // add
	Attachments   []Attachment `json:"attachments,omitempty"` // status
	// UnusedLoopDevices (status): loop devices the daemon holds for no
	// backend. Normally none; any listed is a leak or a recovery leftover.
	UnusedLoopDevices []LoopDevice `json:"unused_loop_devices,omitempty"`
	// Summary (adopt): what was taken over, for the administrator.
	Summary string `json:"summary,omitempty"`
	// Leases (status, cluster mode): the sanlock leases this host holds.
	Leases []Lease `json:"leases,omitempty"`
	// Cluster (status): cluster mode's configuration; nil when it is off.
	Cluster *Cluster `json:"cluster,omitempty"`
}

// Cluster is the daemon's cluster mode configuration, for xenblkd doctor.
type Cluster struct {
	Lockspace  string `json:"lockspace"`
	HostID     uint64 `json:"host_id"`
	Disk       string `json:"disk"`
	Offset     uint64 `json:"offset,omitempty"`
	LeaseDir   string `json:"lease_dir"`
	SanlockDir string `json:"sanlock_dir"`
}

// Lease is a sanlock resource lease the daemon holds for a shared target
// (cluster mode, docs/cluster.md).
type Lease struct {
	Name     string    `json:"name"`     // the sanlock resource name
	Identity string    `json:"identity"` // the target's identity every host computes
	Target   string    `json:"target"`   // the target's path on this host
	Mode     string    `json:"mode"`     // "exclusive", "shared", or "pending" (a migration's hand-over)
	Users    int       `json:"users"`    // backends using it on this host
	Since    time.Time `json:"since,omitzero"`
}

// LoopDevice is a loop device the daemon holds.
type LoopDevice struct {
	Device         string `json:"device"`          // /dev/loopN
	PhysicalDevice string `json:"physical_device"` // major:minor, hex
	DiskSeq        uint64 `json:"diskseq,omitempty"`
}

// Attachment describes one backend's disk.
type Attachment struct {
	Domid          uint32 `json:"domid"`
	Devid          uint32 `json:"devid"`
	Target         string `json:"target"` // params
	Kind           string `json:"kind"`   // "file" or "block device"
	Mode           string `json:"mode"`
	Device         string `json:"device"`          // physical-device-path
	PhysicalDevice string `json:"physical_device"` // major:minor, hex
	DiskSeq        uint64 `json:"diskseq,omitempty"`
	Users          int    `json:"users"`
	// Loop devices only (omitted for block devices): "direct" or "buffered"
	// I/O to the image file, and the logical block size the guest sees.
	IO        string `json:"io,omitempty"`
	BlockSize uint32 `json:"block_size,omitempty"`
	// Status only; each is omitted when unknown. The field names are stable
	// (docs/usage.md, "xenblkd status --json").
	DomainName string    `json:"domain_name,omitempty"` // /local/domain/<domid>/name
	Vdev       string    `json:"vdev,omitempty"`        // the backend's dev node, e.g. xvda
	Since      time.Time `json:"since,omitzero"`        // when the daemon attached it (RFC 3339)
}

// ErrDaemonUnreachable: nothing listens on the socket.
var ErrDaemonUnreachable = errors.New("xenblkd daemon is not running")

// Call sends req to the daemon at socket and returns its reply. The deadline
// of ctx (or Timeout(req.Op)) bounds the whole exchange.
func Call(ctx context.Context, socket string, req Request) (Response, error) {
	line, err := json.Marshal(req)
	if err != nil {
		return Response{}, err
	}
	reply, err := exchangeWith(ctx, socket, append(line, '\n'), Timeout(req.Op), false)
	if err != nil {
		return Response{}, err
	}
	var resp Response
	if err := json.Unmarshal(reply, &resp); err != nil {
		return Response{}, fmt.Errorf("decode reply from xenblkd daemon at %s: %w", socket, err)
	}
	return resp, nil
}

// HotplugOptions configure CallHotplug.
type HotplugOptions struct {
	// ConnectWait is how long a missing or refused socket is retried (a
	// daemon starting, without systemd's socket to queue on). 0: no retry.
	ConnectWait time.Duration
}

// ErrPeerNotRoot: the process listening on the socket does not run as root,
// so the hotplug entry does not send it the request.
var ErrPeerNotRoot = errors.New("the process listening on the xenblkd socket does not run as root")

// CallHotplug is Call for the Go hotplug entry (the slow path the C entry
// hands over to): it retries a missing or refused socket for
// opts.ConnectWait, and talks only to a daemon running as root.
func CallHotplug(ctx context.Context, socket string, req Request, opts HotplugOptions) (Response, error) {
	line, err := json.Marshal(req)
	if err != nil {
		return Response{}, err
	}
	line = append(line, '\n')
	retryUntil := time.Now().Add(opts.ConnectWait)
	for {
		reply, err := exchangeWith(ctx, socket, line, Timeout(req.Op), true)
		if errors.Is(err, ErrDaemonUnreachable) && time.Now().Before(retryUntil) && ctx.Err() == nil {
			time.Sleep(min(100*time.Millisecond, time.Until(retryUntil)))
			continue
		}
		if errors.Is(err, ErrDaemonUnreachable) && opts.ConnectWait > 0 {
			return Response{}, fmt.Errorf("%w (no one listened on %s for %v): start it with `systemctl start xenblkd` or `xenblkd daemon`",
				ErrDaemonUnreachable, socket, opts.ConnectWait.Round(time.Millisecond))
		}
		if err != nil {
			return Response{}, err
		}
		return DecodeReply(socket, reply)
	}
}

// DecodeReply decodes one reply line of the daemon at socket.
func DecodeReply(socket string, reply []byte) (Response, error) {
	var resp Response
	if err := json.Unmarshal(reply, &resp); err != nil {
		return Response{}, fmt.Errorf("decode reply from xenblkd daemon at %s: %w", socket, err)
	}
	return resp, nil
}

// exchangeWith sends line on a new connection to socket and returns the
// reply line. The deadline of ctx, else timeout (0: none), bounds it. With
// rootOnly it sends nothing to a peer that does not run as root
// (SO_PEERCRED).
func exchangeWith(ctx context.Context, socket string, line []byte, timeout time.Duration, rootOnly bool) ([]byte, error) {
	deadline, ok := ctx.Deadline()
	if !ok && timeout > 0 {
		deadline, ok = time.Now().Add(timeout), true
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("create socket: %w", err)
	}
	defer unix.Close(fd)
	if ok {
		tv := unix.NsecToTimeval(max(time.Until(deadline), time.Millisecond).Nanoseconds())
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	}

	if err := retryEINTR(func() error { return unix.Connect(fd, &unix.SockaddrUnix{Name: socket}) }); err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ECONNREFUSED) {
			return nil, fmt.Errorf("%w (no one listens on %s): start it with `systemctl start xenblkd` or `xenblkd daemon`", ErrDaemonUnreachable, socket)
		}
		return nil, fmt.Errorf("connect to xenblkd daemon at %s: %w", socket, err)
	}
	if rootOnly {
		cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
		if err != nil {
			return nil, fmt.Errorf("read the credentials of the xenblkd daemon at %s: %w", socket, err)
		}
		if cred.Uid != 0 {
			return nil, fmt.Errorf("%w: %s is served by pid %d, uid %d; the hotplug entry sends requests to a root daemon only (check XENBLKD_SOCKET)",
				ErrPeerNotRoot, socket, cred.Pid, cred.Uid)
		}
	}
	for len(line) > 0 {
		var n int
		err := retryEINTR(func() (err error) { n, err = unix.Write(fd, line); return err })
		if err != nil {
			return nil, fmt.Errorf("send request to xenblkd daemon at %s: %w", socket, err)
		}
		line = line[n:]
	}

	var reply []byte
	buf := make([]byte, 4096)
	for !bytes.HasSuffix(reply, []byte("\n")) {
		var n int
		err := retryEINTR(func() (err error) { n, err = unix.Read(fd, buf); return err })
		if errors.Is(err, unix.EAGAIN) {
			return nil, fmt.Errorf("xenblkd daemon at %s did not answer in time", socket)
		}
		if err != nil {
			return nil, fmt.Errorf("read reply from xenblkd daemon at %s: %w", socket, err)
		}
		if n == 0 {
			return nil, fmt.Errorf("xenblkd daemon at %s closed the connection without answering (see its log)", socket)
		}
		reply = append(reply, buf[:n]...)
		if len(reply) > MaxMessage {
			return nil, fmt.Errorf("reply from xenblkd daemon at %s exceeds %d bytes", socket, MaxMessage)
		}
	}
	return reply, nil
}

func retryEINTR(f func() error) error {
	for {
		if err := f(); !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}
