package loop

import (
	"os"

	"golang.org/x/sys/unix"
)

// openBacking opens path for use as a backing file and checks its type.
func openBacking(path string, readOnly bool) (*os.File, error) {
	mode := unix.O_RDWR
	if readOnly {
		mode = unix.O_RDONLY
	}
	// O_NONBLOCK so that opening a FIFO does not wait for a peer (we reject
	// it below); O_NOCTTY so that a tty path cannot become our terminal.
	fd, err := unix.Open(path, mode|unix.O_CLOEXEC|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, &OpError{Op: "open backing file", Dev: path, Err: err}
	}
	if _, err := fileID(fd, readOnly); err != nil {
		unix.Close(fd)
		return nil, &OpError{Op: "open backing file", Dev: path, Err: err}
	}
	// Regular files and block devices ignore O_NONBLOCK, but clear it so the
	// fd looks exactly like an ordinary open to whoever reads it next.
	if err := setBlocking(fd); err != nil {
		unix.Close(fd)
		return nil, &OpError{Op: "open backing file", Dev: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// checkBacking returns the identity of the file behind fd and fails with an
// input error unless a loop device can be bound to it as opts asks.
func checkBacking(fd int, opts Options) (FileID, error) {
	id, err := fileID(fd, opts.ReadOnly)
	if err != nil {
		return FileID{}, err
	}
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return FileID{}, err
	}
	// LOOP_CONFIGURE needs read access; O_PATH fds have none (ioctl EBADF).
	if flags&unix.O_PATH != 0 || flags&unix.O_ACCMODE == unix.O_WRONLY {
		return FileID{}, ErrNotReadable
	}
	// The kernel would silently force LO_FLAGS_READ_ONLY (loop_configure,
	// drivers/block/loop.c): refuse instead of handing out a surprise.
	if !opts.ReadOnly && flags&unix.O_ACCMODE != unix.O_RDWR {
		return FileID{}, ErrReadOnlyFile
	}
	return id, nil
}

// fileID fstats fd and fails with an input error unless it is a regular file
// or block device (what loop_validate_file accepts), non-empty unless the
// device is to be read-only.
//
// The kernel binds a loop device to a 0-byte file too (a 0-sector disk). Xen
// 4.19+ relies on it: libxl passes an empty CD-ROM drive to the disk's script
// as a 0-byte placeholder (/var/run/xen/empty-cdrom.<domid>, mode 0400; read-only,
// xl's default access for a CD-ROM), and the stock block script's losetup binds it. A read-write disk
// of 0 bytes can hold nothing: it is refused, as the mistake it is (an image
// never written), with ErrEmptyFile.
func fileID(fd int, readOnly bool) (FileID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return FileID{}, err
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		if st.Size == 0 && !readOnly {
			return FileID{}, ErrEmptyFile
		}
	case unix.S_IFBLK:
		size, err := unix.IoctlGetUint64(fd, unix.BLKGETSIZE64)
		if err != nil {
			return FileID{}, err
		}
		if size == 0 && !readOnly {
			return FileID{}, ErrEmptyFile
		}
	case unix.S_IFDIR:
		return FileID{}, ErrDirectory
	case unix.S_IFIFO:
		return FileID{}, ErrFIFO
	case unix.S_IFCHR:
		return FileID{}, ErrCharDevice
	default:
		return FileID{}, ErrNotRegular
	}
	return FileID{Dev: uint64(st.Dev), Ino: st.Ino}, nil
}

func setBlocking(fd int) error {
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags&^unix.O_NONBLOCK)
	return err
}
