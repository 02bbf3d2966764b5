package loop

import (
	"errors"

	"golang.org/x/sys/unix"
)

// OpError is the error every function of this package returns: the failing
// operation, the object it acted on and the cause. Compare causes with
// errors.Is (unix.EBUSY, ErrNotBound, fs.ErrNotExist, ...).
type OpError struct {
	Op  string // "attach", "configure", "open", "verify", ...
	Dev string // the loop device (/dev/loopN), or the backing file for backing-file errors
	Err error
}

func (e *OpError) Error() string {
	if e.Dev == "" {
		return "loop: " + e.Op + ": " + e.Err.Error()
	}
	return "loop: " + e.Op + " " + e.Dev + ": " + e.Err.Error()
}

func (e *OpError) Unwrap() error { return e.Err }

// ErrDiskSeqMismatch: the device's diskseq is not the one expected, i.e. it was
// cleared and possibly re-bound to something else since it was recorded.
var ErrDiskSeqMismatch = errors.New("diskseq mismatch: loop device was reused")

// ErrNotBound: the device exists but is not bound to a backing file.
var ErrNotBound = errors.New("loop device not bound")

// ErrBindingChanged: a device this process holds no longer looks as it did
// when attached (other backing file, AUTOCLEAR cleared by someone else), or a
// freshly configured device does not carry what was asked for.
var ErrBindingChanged = errors.New("loop device binding changed")

// inputError is a bad-input sentinel that also matches its errno, so callers
// may test errors.Is(err, ErrDirectory) or errors.Is(err, unix.EINVAL).
type inputError struct {
	msg   string
	errno unix.Errno
}

func (e *inputError) Error() string        { return e.msg }
func (e *inputError) Is(target error) bool { return target == e.errno }

// Bad input to Attach and OpenBacking. Each also matches the errno in brackets.
var (
	ErrDirectory    error = &inputError{"backing file is a directory, not a regular file or block device", unix.EISDIR}
	ErrFIFO         error = &inputError{"backing file is a FIFO, not a regular file or block device", unix.EINVAL}
	ErrCharDevice   error = &inputError{"backing file is a character device, not a regular file or block device", unix.EINVAL}
	ErrNotRegular   error = &inputError{"backing file is not a regular file or block device", unix.EINVAL}
	ErrEmptyFile    error = &inputError{"backing file is empty (0 bytes) and the disk read-write (an empty file is attached read-only only, as an empty CD-ROM)", unix.EINVAL}
	ErrNotReadable  error = &inputError{"backing file descriptor is not open for reading", unix.EBADF}
	ErrReadOnlyFile error = &inputError{"backing file is open read-only but a read-write device was asked for", unix.EROFS}
	ErrTagTooLong   error = &inputError{"tag longer than 63 bytes or contains a NUL byte", unix.EINVAL}
	ErrBlockSize    error = &inputError{"block size must be a power of two from 512 to 65536", unix.EINVAL}
	ErrNotLoop      error = &inputError{"not a loop block device", unix.ENOTTY}
)
