package loop

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

func devPath(index int) string { return "/dev/loop" + strconv.Itoa(index) }

// readBinding reads the binding of the loop device open on fd. While fd is
// open the binding cannot go away (we are an opener, so neither AUTOCLEAR nor
// LOOP_CLR_FD can clear it), so the values are consistent with each other.
func readBinding(fd int, path string) (Binding, error) {
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err == unix.ENXIO { // loop_get_status: ENXIO unless Lo_bound
		return Binding{}, ErrNotBound
	}
	if err != nil {
		return Binding{}, fmt.Errorf("get status: %w", err)
	}
	seq, err := diskSeq(fd)
	if err != nil && err != unix.ENOTTY {
		return Binding{}, fmt.Errorf("get diskseq: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return Binding{}, fmt.Errorf("fstat: %w", err)
	}
	return Binding{
		Number:  int(info.Number),
		Path:    path,
		Rdev:    uint64(st.Rdev),
		DiskSeq: seq,
		Backing: FileID{Dev: info.Device, Ino: info.Inode},
		Flags:   info.Flags,
		Tag:     cString(info.File_name[:]),
	}, nil
}

// diskSeq reads the device's diskseq from the fd itself (not the path, which
// may name another binding by now). BLKGETDISKSEQ: Linux 5.15; ENOTTY before.
func diskSeq(fd int) (uint64, error) {
	return unix.IoctlGetUint64(fd, unix.BLKGETDISKSEQ)
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// open implements Open.
func open(number int, want uint64) (*Device, error) {
	path := devPath(number)
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &OpError{Op: "open", Dev: path, Err: err}
	}
	d, err := openChecked(fd, path, want)
	if err != nil {
		unix.Close(fd)
		return nil, &OpError{Op: "open", Dev: path, Err: err}
	}
	return d, nil
}

// openChecked checks the diskseq first: a cleared device has a new diskseq,
// so a mismatch says "reused or cleared" whatever the device is bound to now.
func openChecked(fd int, path string, want uint64) (*Device, error) {
	seq, err := diskSeq(fd)
	if err != nil {
		return nil, fmt.Errorf("get diskseq: %w", err)
	}
	if seq != want {
		return nil, fmt.Errorf("%w (diskseq %d, want %d)", ErrDiskSeqMismatch, seq, want)
	}
	b, err := readBinding(fd, path)
	if err != nil {
		return nil, err
	}
	io, err := readIOMode(fd, b)
	if err != nil {
		return nil, err
	}
	return &Device{fd: fd, binding: b, io: io}, nil
}

// adopt implements Adopt.
func adopt(fd int) (*Device, error) {
	name := "fd " + strconv.Itoa(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, &OpError{Op: "adopt", Dev: name, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(uint64(st.Rdev)) != Major {
		return nil, &OpError{Op: "adopt", Dev: name, Err: ErrNotLoop}
	}
	b, err := readBinding(fd, name)
	if err != nil {
		return nil, &OpError{Op: "adopt", Dev: name, Err: err}
	}
	b.Path = devPath(b.Number)
	io, err := readIOMode(fd, b)
	if err != nil {
		return nil, &OpError{Op: "adopt", Dev: b.Path, Err: err}
	}
	return &Device{fd: fd, binding: b, io: io}, nil
}

// verify implements Device.Verify on the held fd.
func verify(fd int, was Binding) error {
	now, err := readBinding(fd, was.Path)
	switch {
	case err != nil:
		return &OpError{Op: "verify", Dev: was.Path, Err: err}
	case now.DiskSeq != was.DiskSeq:
		err = fmt.Errorf("%w (diskseq %d, want %d)", ErrDiskSeqMismatch, now.DiskSeq, was.DiskSeq)
	case now.Backing != was.Backing || now.Number != was.Number:
		err = fmt.Errorf("%w: loop%d backing %d:%d, want loop%d backing %d:%d", ErrBindingChanged,
			now.Number, now.Backing.Dev, now.Backing.Ino, was.Number, was.Backing.Dev, was.Backing.Ino)
	case was.Flags&unix.LO_FLAGS_AUTOCLEAR != 0 && now.Flags&unix.LO_FLAGS_AUTOCLEAR == 0:
		// e.g. `losetup --nooverlap` reusing our device clears AUTOCLEAR;
		// the device would then outlive every opener.
		err = fmt.Errorf("%w: AUTOCLEAR was cleared (lo_flags %#x)", ErrBindingChanged, now.Flags)
	default:
		return nil
	}
	return &OpError{Op: "verify", Dev: was.Path, Err: err}
}

func closeFd(fd int) error { return unix.Close(fd) }

// list implements List.
//
// sysfs first: /sys/block/loopN/loop/ exists only while the device is bound
// (loop_sysfs_init/exit), so unbound devices are skipped without opening
// them. sysfs has no backing dev/ino, flags or tag, so each bound device is
// then opened O_RDONLY for LOOP_GET_STATUS64 and BLKGETDISKSEQ on that fd
// (consistent with each other, unlike sysfs diskseq read separately).
//
// That extra open is harmless: our close can clear an AUTOCLEAR device only
// if every other opener is gone, i.e. a clear that was already due and that
// we delayed by microseconds; and an O_RDONLY close does not fire udev's
// IN_CLOSE_WRITE watch (60-block.rules), so it triggers no re-probe.
func list() ([]Binding, error) { return listSkipping(nil) }

func listSkipping(skip func(path string) bool) ([]Binding, error) {
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		return nil, &OpError{Op: "list", Err: err}
	}
	var bindings []Binding
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), "loop")
		index, err := strconv.Atoi(rest)
		if !ok || err != nil || index < 0 {
			continue
		}
		if skip != nil && skip(devPath(index)) {
			continue
		}
		if _, err := os.Stat("/sys/block/" + e.Name() + "/loop"); err != nil {
			continue
		}
		b, err := inspect(index)
		// Cleared (ErrNotBound), in rundown (ENXIO) or removed (ENOENT)
		// since the sysfs check: not bound any more, so not listed.
		if errors.Is(err, ErrNotBound) || errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENOENT) {
			continue
		}
		if err != nil {
			return nil, err
		}
		bindings = append(bindings, b)
	}
	slices.SortFunc(bindings, func(a, b Binding) int { return a.Number - b.Number })
	return bindings, nil
}

// inspect reads one device's binding through a short-lived O_RDONLY fd.
func inspect(index int) (Binding, error) {
	path := devPath(index)
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return Binding{}, &OpError{Op: "open", Dev: path, Err: err}
	}
	defer unix.Close(fd)
	b, err := readBinding(fd, path)
	if err != nil {
		return Binding{}, &OpError{Op: "inspect", Dev: path, Err: err}
	}
	return b, nil
}
