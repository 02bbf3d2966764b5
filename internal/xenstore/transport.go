package xenstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"
)

// Default transports, in the order Dial tries them (libxenstore's order).
var (
	defaultSockets = []string{"/run/xenstored/socket", "/var/run/xenstored/socket"}
	defaultXenbus  = "/dev/xen/xenbus"
)

// transport is one way to reach xenstored: a unix socket, or a device file
// such as /dev/xen/xenbus speaking the same framing.
type transport struct {
	path string
	unix bool
}

// serial reports whether requests on this transport go one at a time: on a
// xenbus device (conn.inflight), not on a socket.
func (t transport) serial() bool { return !t.unix }

func (t transport) open() (*os.File, error) {
	if t.unix {
		return dialUnix(t.path)
	}
	return openDevice(t.path)
}

// chooseTransports returns the candidates Dial tries in order. A set,
// non-empty XENSTORED_PATH is the only candidate: a socket if it is one,
// else a device file. (libxenstore treats a set-but-empty XENSTORED_PATH as
// a path; here it counts as unset.)
func chooseTransports(env string, envSet bool, sockets []string, xenbus string) []transport {
	if envSet && env != "" {
		fi, err := os.Stat(env)
		if err == nil && fi.Mode()&fs.ModeSocket == 0 {
			return []transport{{path: env}}
		}
		return []transport{{path: env, unix: true}}
	}
	ts := make([]transport, 0, len(sockets)+1)
	for _, s := range sockets {
		ts = append(ts, transport{path: s, unix: true})
	}
	return append(ts, transport{path: xenbus})
}

// dialTransports connects to the first candidate that answers. Candidates
// that are absent or refuse (a stale socket of a dead xenstored) are skipped;
// the client then redials that same transport on every reconnect.
func dialTransports(ctx context.Context, ts []transport) (*Client, error) {
	var firstErr error
	for _, t := range ts {
		if err := ctx.Err(); err != nil {
			return nil, &Error{Op: "dial", Path: t.path, Err: err}
		}
		f, err := t.open()
		if err != nil {
			if firstErr == nil {
				firstErr = &Error{Op: "dial", Path: t.path, Err: err}
			}
			if len(ts) > 1 && (errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ECONNREFUSED)) {
				continue
			}
			return nil, firstErr
		}
		c := newClient(t.path, t.open)
		c.serial = t.serial()
		cn := newConn(f, c.serial)
		c.conn = cn // before the reader starts: it reads c.conn when cn dies
		go cn.readLoop(c)
		return c, nil
	}
	if len(ts) > 1 {
		return nil, fmt.Errorf("no xenstored socket or xenbus device answered (is xenstored running?): %w", firstErr)
	}
	return nil, firstErr
}

// dialUnix connects an AF_UNIX stream socket without package net: the fd is
// made non-blocking and wrapped by os.NewFile, which registers it with the
// runtime poller (reads park the goroutine, Close wakes them).
func dialUnix(path string) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	for {
		err = unix.Connect(fd, &unix.SockaddrUnix{Name: path})
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("set non-blocking: %w", err)
	}
	return os.NewFile(uintptr(fd), path), nil
}

// openDevice opens a xenbus-like device. os.OpenFile uses the poller if the
// device supports epoll and falls back to blocking reads if not; either way
// the client works (see conn.fail for the cost of a blocking fd).
func openDevice(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			return nil, pe.Err
		}
		return nil, err
	}
	return f, nil
}
