// Package api is the daemon's local API: one newline-terminated JSON request
// per unix stream connection, one newline-terminated JSON reply, then close.
// The client uses raw syscalls (no net package poller) because the hotplug
// entry point runs it once per disk and must start fast.
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
// $XENBLKD_SOCKET say otherwise.
const DefaultSocket = "/run/xenblkd/api.sock"

// MaxMessage bounds one request or reply line.
const MaxMessage = 1 << 20

// Operations.
const (
	OpAdd    = "add"
	OpRemove = "remove"
	OpStatus = "status"
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
	// Status only; each is omitted when unknown. The field names are stable
	// (docs/usage.md, "xenblkd status --json").
	DomainName string    `json:"domain_name,omitempty"` // /local/domain/<domid>/name
	Vdev       string    `json:"vdev,omitempty"`        // the backend's dev node, e.g. xvda
	Since      time.Time `json:"since,omitzero"`        // when the daemon attached it (RFC 3339)
}

// ErrDaemonUnreachable: nothing listens on the socket.
var ErrDaemonUnreachable = errors.New("xenblkd daemon is not running")

// Call sends req to the daemon at socket and returns its reply. The deadline
// of ctx (or 35 s, below libxl's 40 s SIGKILL) bounds the whole exchange.
func Call(ctx context.Context, socket string, req Request) (Response, error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(35 * time.Second)
	}
	line, err := json.Marshal(req)
	if err != nil {
		return Response{}, err
	}
	line = append(line, '\n')

	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return Response{}, fmt.Errorf("create socket: %w", err)
	}
	defer unix.Close(fd)
	tv := unix.NsecToTimeval(max(time.Until(deadline), time.Millisecond).Nanoseconds())
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)

	if err := retryEINTR(func() error { return unix.Connect(fd, &unix.SockaddrUnix{Name: socket}) }); err != nil {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ECONNREFUSED) {
			return Response{}, fmt.Errorf("%w (no one listens on %s): start it with `systemctl start xenblkd` or `xenblkd daemon`", ErrDaemonUnreachable, socket)
		}
		return Response{}, fmt.Errorf("connect to xenblkd daemon at %s: %w", socket, err)
	}
	for len(line) > 0 {
		var n int
		err := retryEINTR(func() (err error) { n, err = unix.Write(fd, line); return err })
		if err != nil {
			return Response{}, fmt.Errorf("send request to xenblkd daemon at %s: %w", socket, err)
		}
		line = line[n:]
	}

	var reply []byte
	buf := make([]byte, 4096)
	for !bytes.HasSuffix(reply, []byte("\n")) {
		var n int
		err := retryEINTR(func() (err error) { n, err = unix.Read(fd, buf); return err })
		if errors.Is(err, unix.EAGAIN) {
			return Response{}, fmt.Errorf("xenblkd daemon at %s did not answer in time", socket)
		}
		if err != nil {
			return Response{}, fmt.Errorf("read reply from xenblkd daemon at %s: %w", socket, err)
		}
		if n == 0 {
			return Response{}, fmt.Errorf("xenblkd daemon at %s closed the connection without answering (see its log)", socket)
		}
		reply = append(reply, buf[:n]...)
		if len(reply) > MaxMessage {
			return Response{}, fmt.Errorf("reply from xenblkd daemon at %s exceeds %d bytes", socket, MaxMessage)
		}
	}
	var resp Response
	if err := json.Unmarshal(reply, &resp); err != nil {
		return Response{}, fmt.Errorf("decode reply from xenblkd daemon at %s: %w", socket, err)
	}
	return resp, nil
}

func retryEINTR(f func() error) error {
	for {
		if err := f(); !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}
