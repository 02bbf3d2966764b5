package sanlock

import (
	"errors"
	"fmt"
	"syscall"
)

// Results sanlock returns besides negative errnos (sanlock_rv.h).
const (
	CodeAcquireLockspace = -241 // the lockspace is not joined on this host
	CodeAcquireIDDisk    = -242 // the owner's host id is held, its state on disk unreadable
	CodeAcquireIDLive    = -243 // held by another host that is alive
	CodeAcquireOwned     = -244 // held by another host (its lease not yet expired)
	CodeAcquireOther     = -245 // held by another process on this host
	CodeAcquireShRetry   = -246 // shared holders are changing: try again
	CodeOwnedRetry       = -247 // the owner's lease must expire first (AcquireOwnerNoWait)
	CodeLeaderMagic      = -223 // no lease on disk at that place: not initialised
)

var codeNames = map[int32]string{
	-201: "sanlock error", -202: "i/o timeout on the lease storage", -203: "watchdog error",
	-210: "cannot read the paxos blocks", -211: "cannot write the paxos blocks",
	-220: "cannot read the lease", -221: "cannot write the lease", -223: "no lease on disk there (not initialised)",
	-224: "lease of another version", -225: "lease of another sector size", -226: "lease of another lockspace",
	-227: "lease of another resource", -228: "lease for another number of hosts", -229: "lease checksum mismatch",
	-230: "lockspace sizes differ", -231: "invalid host id",
	-240: "lease version mismatch", -241: "lockspace not joined", -242: "owner's host id disk unreadable",
	-243: "held by another live host", -244: "held by another host", -245: "held by another process",
	-246: "shared holders changing, retry", -247: "held by a host whose lease has not expired yet",
	-250: "release: lease version mismatch", -251: "release: not the owner", -262: "host id busy",
}

// Error is a failed request: the sanlock result Code (a negative errno or a
// SANLK_* code), or Err when the socket itself failed.
type Error struct {
	Op   string
	Code int32
	Err  error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("sanlock %s: %v", e.Op, e.Err)
	}
	if n, ok := codeNames[e.Code]; ok {
		return fmt.Sprintf("sanlock %s: %s (%d)", e.Op, n, e.Code)
	}
	if e.Code < 0 && e.Code > -200 {
		return fmt.Sprintf("sanlock %s: %v (%d)", e.Op, syscall.Errno(-e.Code), e.Code)
	}
	return fmt.Sprintf("sanlock %s: error %d", e.Op, e.Code)
}

// Unwrap lets errors.Is match a negative errno result as a syscall.Errno.
func (e *Error) Unwrap() error {
	if e.Err != nil {
		return e.Err
	}
	if e.Code < 0 && e.Code > -200 {
		return syscall.Errno(-e.Code)
	}
	return nil
}

// Broken reports whether err is the connection's own failure (the daemon
// went away, the socket closed) rather than sanlock's answer.
func Broken(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Err != nil
}

// CodeOf returns the sanlock result code of err, or 0.
func CodeOf(err error) int32 {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

// Held reports whether err says another host holds the lease (now, or until
// its lease expires). EAGAIN is an exclusive acquire of a lease others hold
// shared.
func Held(err error) bool {
	if errors.Is(err, syscall.EAGAIN) {
		return true
	}
	switch CodeOf(err) {
	case CodeAcquireIDLive, CodeAcquireOwned, CodeOwnedRetry, CodeAcquireIDDisk, CodeAcquireShRetry:
		return true
	}
	return false
}
