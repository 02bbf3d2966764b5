// Package fdstore speaks systemd's notify protocol (sd_notify(3)) with plain
// syscalls: readiness and status messages, pushing file descriptors into the
// service manager's fd store under a name, removing them, and receiving them
// back on the next start (LISTEN_FDS), together with the sockets of socket
// activation, told apart by name (Take).
//
// It exists instead of coreos/go-systemd because go-systemd cannot send fds
// and pulls crypto/tls into the binary (docs/architecture.md).
//
// Fds are plain ints, never *os.File: an *os.File closes its fd in a
// finalizer, and closing the last fd of an AUTOCLEAR loop device detaches it.
//
// Without systemd ($NOTIFY_SOCKET unset) every sending call is a no-op that
// returns nil; the first such call logs once that the fd store is
// unavailable.
//
// On systemd 252 (Debian 12) the store survives restart, crash (with
// Restart=), daemon-reload and daemon-reexec, but `systemctl stop` drops it;
// from 254 on (Debian 13: 257) FileDescriptorStorePreserve=yes keeps it across
// stop too, and $FDSTORE gives its size, which Store warns before exceeding;
// see docs/fdstore.md.
package fdstore

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// MaxFDsPerMessage is the most fds one notify datagram can carry (the
// kernel's SCM_MAX_FD). Store splits larger sets into several messages.
const MaxFDsPerMessage = 253

// MaxNameLen is the longest fd name systemd accepts (FDNAME=).
const MaxNameLen = 255

// ErrInvalidName is returned (wrapped) for a name systemd would reject.
var ErrInvalidName = errors.New("invalid fd store name")

// listenFDsStart is the first fd systemd passes (SD_LISTEN_FDS_START).
const listenFDsStart = 3

// File is one fd handed back by the service manager, with the name it was
// stored under. The caller owns Fd and must close it (unix.Close) when done.
type File struct {
	Fd   int
	Name string
}

var unavailableOnce sync.Once

// Notify sends one sd_notify(3) state string, e.g. "READY=1",
// "STATUS=adopted 12 devices" or "STOPPING=1". Several assignments may be
// joined with newlines.
func Notify(state string) error {
	if err := send(state, nil); err != nil {
		return fmt.Errorf("fdstore: notify %q: %w", firstLine(state), err)
	}
	return nil
}

// Store pushes fds into the fd store under name, replacing whatever was
// stored under that name before (FDSTOREREMOVE first, as systemd's own
// notify_push_fd does). systemd keeps its own duplicates, so the caller keeps
// and still owns its fds. Storing is silently refused by systemd if the unit
// has no FileDescriptorStoreMax=, or beyond that limit (it logs, the sender
// gets no error).
func Store(name string, fds ...int) error {
	if err := ValidName(name); err != nil {
		return err
	}
	if len(fds) == 0 {
		return fmt.Errorf("fdstore: store %q: no fds", name)
	}
	if err := send("FDSTOREREMOVE=1\nFDNAME="+name, nil); err != nil {
		return fmt.Errorf("fdstore: store %q: remove old: %w", name, err)
	}
	// Counted (and warned about) before the push: systemd refuses fds
	// beyond the store's size without an error to us.
	stored.set(name, len(fds))
	for len(fds) > 0 {
		n := min(len(fds), MaxFDsPerMessage)
		if err := send("FDSTORE=1\nFDNAME="+name, fds[:n]); err != nil {
			return fmt.Errorf("fdstore: store %q: %w", name, err)
		}
		fds = fds[n:]
	}
	return nil
}

// Remove makes the service manager close every fd stored under name. The
// caller's own copies are unaffected.
func Remove(name string) error {
	if err := ValidName(name); err != nil {
		return err
	}
	if err := send("FDSTOREREMOVE=1\nFDNAME="+name, nil); err != nil {
		return fmt.Errorf("fdstore: remove %q: %w", name, err)
	}
	stored.set(name, 0)
	return nil
}

// ValidName reports whether systemd accepts name as an FDNAME: 1 to 255
// printable ASCII characters, no ':' (the LISTEN_FDNAMES separator).
func ValidName(name string) error {
	if name == "" || len(name) > MaxNameLen {
		return fmt.Errorf("%w %q: length %d, want 1..%d", ErrInvalidName, name, len(name), MaxNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c < 0x20 || c > 0x7e || c == ':' {
			return fmt.Errorf("%w %q: byte %#x at %d (want printable ASCII, no ':')", ErrInvalidName, name, c, i)
		}
	}
	return nil
}

// Listen returns the fds the service manager passed to this process (the fd
// store's content on a restart), with their names, and unsets LISTEN_FDS,
// LISTEN_PID, LISTEN_FDNAMES and LISTEN_PIDFDID so children do not inherit
// them. Every returned fd is set close-on-exec. It returns nothing if the
// variables are absent or meant for another process (LISTEN_PID).
func Listen() ([]File, error) {
	defer func() {
		for _, v := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID"} {
			os.Unsetenv(v)
		}
	}()
	files, err := listen(os.Getenv, os.Getpid())
	for _, f := range files {
		stored.set(f.Name, stored.count(f.Name)+1)
	}
	return files, err
}

// Take splits files into those stored or passed under name (e.g. a socket
// unit's FileDescriptorName=) and the rest, each in their order. The named
// ones are taken to be a socket unit's, not the store's: they no longer count
// towards the store's size.
func Take(files []File, name string) (named, rest []File) {
	for _, f := range files {
		if f.Name == name {
			named = append(named, f)
		} else {
			rest = append(rest, f)
		}
	}
	if len(named) > 0 {
		stored.set(name, 0)
	}
	return named, rest
}

func listen(getenv func(string) string, pid int) ([]File, error) {
	pidStr, countStr := getenv("LISTEN_PID"), getenv("LISTEN_FDS")
	if pidStr == "" || countStr == "" {
		return nil, nil
	}
	listenPID, err := strconv.Atoi(pidStr)
	if err != nil {
		return nil, fmt.Errorf("fdstore: parse LISTEN_PID=%q: %w", pidStr, err)
	}
	if listenPID != pid {
		return nil, nil // meant for our parent, inherited by mistake
	}
	count, err := strconv.Atoi(countStr)
	if err != nil || count < 0 {
		return nil, fmt.Errorf("fdstore: parse LISTEN_FDS=%q: want a count", countStr)
	}
	if count == 0 {
		return nil, nil
	}
	// Like sd_listen_fds_with_names: if the names do not match the count,
	// every fd is "unknown".
	names := strings.Split(getenv("LISTEN_FDNAMES"), ":")
	if len(names) != count {
		names = make([]string, count)
		for i := range names {
			names[i] = "unknown"
		}
	}
	files := make([]File, count)
	for i := range count {
		fd := listenFDsStart + i
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
			return nil, fmt.Errorf("fdstore: set close-on-exec on passed fd %d (%s): %w", fd, names[i], err)
		}
		files[i] = File{Fd: fd, Name: names[i]}
	}
	return files, nil
}

// send writes one datagram to $NOTIFY_SOCKET, with fds as SCM_RIGHTS. A
// fresh unconnected socket per message: net.UnixConn.WriteMsgUnix refuses
// connected datagram sockets, and a message this rare needs no pooling.
func send(state string, fds []int) error {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		unavailableOnce.Do(func() {
			slog.Info("systemd fd store unavailable ($NOTIFY_SOCKET unset): notifications are skipped and held loop devices will not survive a daemon restart")
		})
		return nil
	}
	if addr[0] != '/' && addr[0] != '@' {
		return fmt.Errorf("NOTIFY_SOCKET=%q: want an absolute path or @abstract name", addr)
	}
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(s)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	// x/sys/unix turns a leading '@' into the abstract namespace's NUL.
	if err := unix.Sendmsg(s, []byte(state), oob, &unix.SockaddrUnix{Name: addr}, 0); err != nil {
		return fmt.Errorf("sendmsg to %s: %w", addr, err)
	}
	return nil
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i] + "..."
	}
	return s
}
