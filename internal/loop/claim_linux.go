package loop

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Claim takes over a loop device someone else bound (the stock block script's
// `losetup`), while it stays bound and in use: it opens /dev/loop<number>,
// checks that the device is bound to the file want, then sets AUTOCLEAR and
// replaces lo_file_name with tag, so that from then on the device is like one
// Attach made: it is freed once the last opener (the returned Device, and
// xen-blkback) closes it, and it can no longer outlive its users.
//
// Kernel facts this relies on (drivers/block/loop.c, unchanged in substance
// from 5.x to 6.18, checked on 6.18 by TestIntegrationClaim):
//   - LOOP_SET_STATUS64 on a bound device keeps the binding: loop_set_status
//     only drains the queue, copies lo_file_name and the settable flags, and
//     flushes the page cache (EAGAIN possible) only when lo_offset or
//     lo_sizelimit change, which we pass back unchanged from
//     LOOP_GET_STATUS64;
//   - AUTOCLEAR is in LOOP_SET_STATUS_SETTABLE_FLAGS (with PARTSCAN), so it
//     can be set after the fact; READ_ONLY and DIRECT_IO are not touched;
//   - a caller with CAP_SYS_ADMIN may use it on an O_RDONLY fd (lo_ioctl);
//   - the diskseq is not changed (only binding and clearing a device do that).
//
// While our fd is open nobody can clear the device (LOOP_CLR_FD with other
// openers only sets AUTOCLEAR), so what is checked before the change is still
// what is bound after it; the binding is read again and checked anyway.
func Claim(number int, want FileID, tag string) (*Device, error) {
	path := devPath(number)
	if len(tag) >= unix.LO_NAME_SIZE {
		return nil, &OpError{Op: "claim", Dev: path, Err: ErrTagTooLong}
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &OpError{Op: "claim", Dev: path, Err: err}
	}
	d, err := claim(fd, path, want, tag)
	if err != nil {
		unix.Close(fd)
		return nil, &OpError{Op: "claim", Dev: path, Err: err}
	}
	return d, nil
}

func claim(fd int, path string, want FileID, tag string) (*Device, error) {
	b, err := readBinding(fd, path)
	if err != nil {
		return nil, err
	}
	if b.Backing != want {
		return nil, fmt.Errorf("%w: bound to file %d:%d, want %d:%d", ErrBindingChanged,
			b.Backing.Dev, b.Backing.Ino, want.Dev, want.Ino)
	}
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		return nil, fmt.Errorf("get status: %w", err)
	}
	info.Flags = (info.Flags | unix.LO_FLAGS_AUTOCLEAR) & unix.LOOP_SET_STATUS_SETTABLE_FLAGS
	info.File_name = [unix.LO_NAME_SIZE]uint8{}
	copy(info.File_name[:], tag)
	if err := setStatusLegacy(fd, info); err != nil {
		return nil, fmt.Errorf("set AUTOCLEAR: %w", err)
	}
	now, err := readBinding(fd, path)
	switch {
	case err != nil:
		return nil, err
	case now.Backing != b.Backing || now.DiskSeq != b.DiskSeq || now.Number != b.Number:
		return nil, fmt.Errorf("%w while claiming it", ErrBindingChanged)
	case now.Flags&unix.LO_FLAGS_AUTOCLEAR == 0:
		return nil, fmt.Errorf("%w: AUTOCLEAR did not stick (lo_flags %#x)", ErrBindingChanged, now.Flags)
	}
	return &Device{fd: fd, binding: now}, nil
}
