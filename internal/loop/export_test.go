package loop

import (
	"os"

	"golang.org/x/sys/unix"
)

// Retries reports how many failed attempts Attach has retried so far.
func Retries() int64 { return retries.Load() }

// ShrinkRcvBuf sets ix's uevent socket's receive buffer to the kernel's
// minimum (a few events), so that a burst of events overflows it.
func (ix *Index) ShrinkRcvBuf() error {
	var err error
	if cerr := ix.raw.Control(func(fd uintptr) {
		err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 1)
	}); cerr != nil {
		return cerr
	}
	return err
}

// Pause holds the index's lock, so that events queue up in its socket until
// the returned function is called.
func (ix *Index) Pause() (resume func()) { ix.mu.Lock(); return ix.mu.Unlock }

// ParseLoopUevent is parseLoopUevent.
var ParseLoopUevent = parseLoopUevent

// AddNode creates loop device number index (LOOP_CTL_ADD); EEXIST if it
// exists.
func AddNode(index int) error { return controlIoctl(unix.LOOP_CTL_ADD, index) }

// RemoveNode removes the unbound, unopened loop device number index
// (LOOP_CTL_REMOVE); EBUSY if it is bound or open.
func RemoveNode(index int) error { return controlIoctl(unix.LOOP_CTL_REMOVE, index) }

func controlIoctl(req uintptr, index int) error {
	ctl, err := unix.Open(controlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(ctl)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(ctl), req, uintptr(index)); errno != 0 {
		return errno
	}
	return nil
}

// AttachAt binds the existing, unbound loop device number index to backing
// as Attach would (one LOOP_CONFIGURE with AUTOCLEAR), without picking a
// free device: for tests that place many devices at indexes of their own.
func AttachAt(index int, backing *os.File, opts Options) (*Device, error) {
	config := loopConfig(int(backing.Fd()), opts)
	fd, err := openForConfigure(index, opts.ReadOnly)
	if err != nil {
		return nil, err
	}
	if err := configure(fd, index, &config, false); err != nil {
		unix.Close(fd)
		return nil, err
	}
	b, err := readBinding(fd, devPath(index))
	if err != nil {
		release(fd)
		return nil, err
	}
	io, err := readIOMode(fd, b)
	if err != nil {
		release(fd)
		return nil, err
	}
	return &Device{fd: fd, binding: b, io: io}, nil
}

// AttachLegacy is Attach forced down the pre-5.8 path (LOOP_SET_FD +
// LOOP_SET_STATUS64 + LOOP_SET_BLOCK_SIZE + LOOP_SET_DIRECT_IO).
func AttachLegacy(backing *os.File, opts Options) (*Device, error) {
	return attach(backing, opts, true)
}

// List lists every bound loop device in the system, ordered by number
// (devices cleared or removed meanwhile are left out): the tests' view of
// the host. The daemon never needs all of them (Index, FindByBacking).
func List() ([]Binding, error) { return list() }
