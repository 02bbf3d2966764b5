package loop

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

const (
	controlPath = "/dev/loop-control"

	// maxAttempts bounds the allocation loop, as in systemd and util-linux.
	maxAttempts = 64

	// freshAfterBusy: after this many EBUSY in a row on the same index, stop
	// asking LOOP_CTL_GET_FREE (which keeps returning the first unbound
	// device, e.g. one someone holds O_EXCL) and create a new device.
	freshAfterBusy = 2

	// legacyStatusTries bounds the EAGAIN retries of LOOP_SET_STATUS64.
	legacyStatusTries = 64
)

// retries counts failed attempts that Attach retried (tests report it).
var retries atomic.Int64

// attach implements Attach; legacy forces the pre-5.8 path (tests only).
func attach(backing *os.File, opts Options, legacy bool) (*Device, error) {
	name := backing.Name()
	if err := checkOptions(opts); err != nil {
		return nil, &OpError{Op: "attach", Dev: name, Err: err}
	}
	backingFd := int(backing.Fd())
	defer runtime.KeepAlive(backing) // backingFd must stay open until the kernel has its own reference
	want, err := checkBacking(backingFd, opts)
	if err != nil {
		return nil, &OpError{Op: "attach", Dev: name, Err: err}
	}
	config := loopConfig(backingFd, opts)

	var lastErr error
	lastIndex, busy := -1, 0
	for attempt := range maxAttempts {
		if attempt > 0 {
			backoff(attempt)
		}
		d, index, err := attachOnce(&config, opts, want, busy >= freshAfterBusy, legacy)
		if err == nil {
			return d, nil
		}
		if !retryable(err) {
			return nil, err
		}
		lastErr = err
		retries.Add(1)
		if errors.Is(err, unix.EBUSY) && index == lastIndex {
			busy++
		} else {
			busy = 0
		}
		lastIndex = index
	}
	return nil, &OpError{Op: "attach", Dev: name,
		Err: fmt.Errorf("no usable loop device after %d attempts: %w", maxAttempts, lastErr)}
}

// checkOptions rejects options that LOOP_CONFIGURE would refuse with EINVAL:
// an EINVAL from LOOP_CONFIGURE must mean "kernel < 5.8" (see configure).
func checkOptions(opts Options) error {
	if len(opts.Tag) >= unix.LO_NAME_SIZE || strings.IndexByte(opts.Tag, 0) >= 0 {
		return ErrTagTooLong
	}
	// blk_validate_block_size: a power of two from 512 to the page size
	// (up to 64 KiB since large block size support, 6.11); a size the running
	// kernel refuses still fails cleanly, at LOOP_SET_BLOCK_SIZE.
	if bs := opts.BlockSize; bs != 0 && (bs < 512 || bs > 65536 || bs&(bs-1) != 0) {
		return ErrBlockSize
	}
	return nil
}

// loopConfig builds the one LOOP_CONFIGURE request: AUTOCLEAR always,
// READ_ONLY and DIRECT_IO as asked, never PARTSCAN (guest partition tables
// are untrusted and dom0 has no use for them).
func loopConfig(backingFd int, opts Options) unix.LoopConfig {
	config := unix.LoopConfig{Fd: uint32(backingFd), Size: opts.BlockSize}
	if config.Size == 0 {
		config.Size = 512
	}
	config.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
	if opts.ReadOnly {
		config.Info.Flags |= unix.LO_FLAGS_READ_ONLY
	}
	if opts.DirectIO {
		config.Info.Flags |= unix.LO_FLAGS_DIRECT_IO
	}
	copy(config.Info.File_name[:], opts.Tag)
	return config
}

// retryable reports whether another attempt with another device may succeed:
// EBUSY (someone outside our lock configured the device first, or holds it
// O_EXCL), ENXIO (device in rundown), ENOENT (node removed after GET_FREE),
// EAGAIN (LOOP_SET_STATUS64 racing udev), ErrBindingChanged (verification).
func retryable(err error) bool {
	var op *OpError
	if !errors.As(err, &op) || op.Dev == controlPath {
		return false // /dev/loop-control itself failing will not get better
	}
	for _, e := range []error{unix.EBUSY, unix.ENXIO, unix.ENOENT, unix.EAGAIN, ErrBindingChanged} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// backoff sleeps a random time below 100 µs × 2^attempt (at most 6.4 ms) so
// that racing allocators fall out of step.
func backoff(attempt int) {
	time.Sleep(rand.N(100 * time.Microsecond << min(attempt, 6)))
}

// attachOnce makes one attempt: bind a free device under the loop-control
// lock, then read and verify what the kernel made of it. index is the device
// tried (-1 if none); on failure everything taken is released.
func attachOnce(config *unix.LoopConfig, opts Options, want FileID, fresh, legacy bool) (d *Device, index int, err error) {
	fd, index, err := bindFree(config, opts, fresh, legacy)
	if err != nil {
		return nil, index, err
	}
	path := devPath(index)
	b, err := readBinding(fd, path)
	if err == nil {
		err = checkConfigured(b, want, opts)
	}
	var io ioMode
	if err == nil {
		b, io, err = settleIO(fd, b, opts) // dio_linux.go
	}
	if err != nil {
		release(fd)
		return nil, index, &OpError{Op: "verify", Dev: path, Err: err}
	}
	return &Device{fd: fd, binding: b, io: io}, index, nil
}

// bindFree takes the allocation lock, picks a free device, opens and
// configures it, and drops the lock. It returns the configured device's fd.
func bindFree(config *unix.LoopConfig, opts Options, fresh, legacy bool) (fd, index int, err error) {
	ctl, err := lockControl()
	if err != nil {
		return -1, -1, err
	}
	defer unix.Close(ctl) // releases the flock
	index, err = pickDevice(ctl, fresh)
	if err != nil {
		return -1, -1, err
	}
	fd, err = openForConfigure(index, opts.ReadOnly)
	if err != nil {
		return -1, index, err
	}
	if err := configure(fd, index, config, legacy); err != nil {
		unix.Close(fd)
		return -1, index, err
	}
	return fd, index, nil
}

// lockControl opens /dev/loop-control and takes its BSD lock: systemd and
// xenblkd serialise GET_FREE+CONFIGURE on it, so cooperating allocators never
// race for the same device (losetup does not take it; see retryable).
func lockControl() (int, error) {
	ctl, err := unix.Open(controlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &OpError{Op: "open", Dev: controlPath, Err: err}
	}
	for {
		err = unix.Flock(ctl, unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		unix.Close(ctl)
		return -1, &OpError{Op: "lock", Dev: controlPath, Err: err}
	}
	return ctl, nil
}

// pickDevice asks for a free device: LOOP_CTL_GET_FREE (the first unbound
// device, created if none; Linux 3.1), or with fresh LOOP_CTL_ADD(-1), which
// always creates a new device at the lowest unused index.
func pickDevice(ctl int, fresh bool) (int, error) {
	req, arg, op := uintptr(unix.LOOP_CTL_GET_FREE), uintptr(0), "get free device"
	if fresh {
		// loop_control_ioctl passes parm to loop_add(int): ^0 is -1, "any index".
		req, arg, op = unix.LOOP_CTL_ADD, ^uintptr(0), "add device"
	}
	n, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(ctl), req, arg)
	if errno != 0 {
		return -1, &OpError{Op: op, Dev: controlPath, Err: errno}
	}
	return int(n), nil
}

// openForConfigure opens /dev/loopN O_RDWR, or O_RDONLY for a read-only
// device: LOOP_CONFIGURE forces READ_ONLY when the loop fd is not writable.
func openForConfigure(index int, readOnly bool) (int, error) {
	mode := unix.O_RDWR
	if readOnly {
		mode = unix.O_RDONLY
	}
	path := devPath(index)
	fd, err := unix.Open(path, mode|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &OpError{Op: "open", Dev: path, Err: err}
	}
	return fd, nil
}

// configure binds fd's device with one LOOP_CONFIGURE (Linux 5.8, commit
// 3448914e8cc5), falling back to LOOP_SET_FD + LOOP_SET_STATUS64 only where
// LOOP_CONFIGURE does not exist: older kernels answer EINVAL (lo_ioctl's
// default case), some compat layers ENOTTY or ENOSYS (as util-linux decides).
func configure(fd, index int, config *unix.LoopConfig, legacy bool) error {
	if !legacy {
		err := unix.IoctlLoopConfigure(fd, config)
		if err == nil {
			return nil
		}
		if err != unix.EINVAL && err != unix.ENOTTY && err != unix.ENOSYS {
			return &OpError{Op: "configure", Dev: devPath(index), Err: err}
		}
	}
	return configureLegacy(fd, index, config)
}

// configureLegacy binds the device the pre-5.8 way.
//
// Leak window: LOOP_SET_FD binds without AUTOCLEAR; until LOOP_SET_STATUS64
// sets it, a death of this process (SIGKILL, OOM) leaves the device bound
// with nobody to clear it (`losetup -d` then frees it). Other failures here
// clear the device we just bound with LOOP_CLR_FD.
func configureLegacy(fd, index int, config *unix.LoopConfig) error {
	path := devPath(index)
	// READ_ONLY comes from the fd modes at LOOP_SET_FD (loop fd opened
	// O_RDONLY, or backing not writable): LOOP_SET_STATUS64 cannot set it.
	if err := unix.IoctlSetInt(fd, unix.LOOP_SET_FD, int(config.Fd)); err != nil {
		return &OpError{Op: "set fd", Dev: path, Err: err}
	}
	info := config.Info
	info.Flags &= unix.LOOP_SET_STATUS_SETTABLE_FLAGS
	if err := setStatusLegacy(fd, &info); err != nil {
		clearFd(fd)
		return &OpError{Op: "set status", Dev: path, Err: err}
	}
	// Block size before direct I/O: the kernel allows direct I/O only when
	// the loop's logical block size is at least the backing file's DIO
	// alignment, so a 4096-byte device must have its size first.
	if config.Size != 512 { // LOOP_SET_BLOCK_SIZE: Linux 4.14
		if err := unix.IoctlSetInt(fd, unix.LOOP_SET_BLOCK_SIZE, int(config.Size)); err != nil {
			clearFd(fd)
			return &OpError{Op: "set block size", Dev: path, Err: err}
		}
	}
	if config.Info.Flags&unix.LO_FLAGS_DIRECT_IO != 0 {
		// LOOP_SET_DIRECT_IO (4.10) fails with EINVAL where LOOP_CONFIGURE
		// silently falls back: either way the device stays buffered, and
		// settleIO reports it.
		_ = unix.IoctlSetInt(fd, unix.LOOP_SET_DIRECT_IO, 1)
	}
	return nil
}

// setStatusLegacy retries LOOP_SET_STATUS64 on EAGAIN, which it returns
// since 5.0 (commit 5db470e229e2) while someone, typically udev, has the
// device open during a change (systemd PR #16859).
func setStatusLegacy(fd int, info *unix.LoopInfo64) error {
	var err error
	for try := range legacyStatusTries {
		if err = unix.IoctlLoopSetStatus64(fd, info); err != unix.EAGAIN {
			return err
		}
		backoff(try + 1)
	}
	return err
}

// checkConfigured fails unless the freshly configured device is bound to the
// backing file asked for, with AUTOCLEAR and the read-only mode asked for.
// Vanilla 5.8 silently ignored some LOOP_CONFIGURE fields (systemd's
// loop_configure_verify). Direct I/O and the block size are settled next,
// by settleIO: the kernel may legitimately refuse direct I/O.
func checkConfigured(b Binding, want FileID, opts Options) error {
	switch {
	case b.Backing != want:
		return fmt.Errorf("%w: backing file is %d:%d, want %d:%d",
			ErrBindingChanged, b.Backing.Dev, b.Backing.Ino, want.Dev, want.Ino)
	case b.Flags&unix.LO_FLAGS_AUTOCLEAR == 0:
		return fmt.Errorf("%w: AUTOCLEAR not set (lo_flags %#x)", ErrBindingChanged, b.Flags)
	case (b.Flags&unix.LO_FLAGS_READ_ONLY != 0) != opts.ReadOnly:
		return fmt.Errorf("%w: read-only is %v, want %v (lo_flags %#x)",
			ErrBindingChanged, !opts.ReadOnly, opts.ReadOnly, b.Flags)
	case b.Tag != opts.Tag:
		return fmt.Errorf("%w: tag %q, want %q", ErrBindingChanged, b.Tag, opts.Tag)
	}
	return nil
}

// release gives up a device this process configured but will not hand out.
// LOOP_CLR_FD first, because a device that failed verification may lack
// AUTOCLEAR; the kernel defers the clear until the last opener is gone.
func release(fd int) {
	clearFd(fd)
	unix.Close(fd)
}

func clearFd(fd int) { _ = unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0) }
