package daemon

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"xenblkd/internal/model"
)

// openTarget opens params with the access mode asks for and decides by fstat
// of the opened fd what it is, so nothing can be swapped between check and
// use. It first opens with O_PATH: that never blocks (a FIFO) and has no side
// effects (a tape or tty), then re-opens the same inode through /proc/self/fd
// only once it is known to be a block device or a regular file.
func openTarget(params string, writable bool) (*os.File, model.Target, error) {
	p := params
	if !filepath.IsAbs(p) {
		p = "/dev/" + p // as the stock script treats phy:sdb
	}
	pathFd, err := unix.Open(p, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			if !filepath.IsAbs(params) {
				return nil, model.Target{}, &notFoundError{fmt.Sprintf("params %q: no such device %s (a relative params names a node under /dev)", q(params), q(p))}
			}
			return nil, model.Target{}, &notFoundError{fmt.Sprintf("params %q: no such file or device", q(params))}
		}
		return nil, model.Target{}, fmt.Errorf("params %q: open %s: %w", q(params), q(p), err)
	}
	defer unix.Close(pathFd)
	var st unix.Stat_t
	if err := unix.Fstat(pathFd, &st); err != nil {
		return nil, model.Target{}, fmt.Errorf("params %q: stat: %w", q(params), err)
	}
	target := model.Target{Path: p}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		target.Kind, target.Rdev = model.BlockDevice, st.Rdev
	case unix.S_IFREG:
		target.Kind, target.File = model.RegularFile, model.FileID{Dev: st.Dev, Ino: st.Ino}
		if writable && st.Mode&0o222 == 0 {
			return nil, model.Target{}, fmt.Errorf("params %q: the file is read-only (permissions %#o) but mode is w: use mode r, or make the file writable",
				q(params), st.Mode&0o7777)
		}
	default:
		return nil, model.Target{}, fmt.Errorf("params %q is a %s: expected a block device or a regular image file", q(params), fileType(st.Mode))
	}

	flags := unix.O_RDONLY
	if writable {
		flags = unix.O_RDWR
	}
	fd, err := unix.Open(fmt.Sprintf("/proc/self/fd/%d", pathFd), flags|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		how := "reading"
		if writable {
			how = "writing (mode w)"
		}
		hint := ""
		if errors.Is(err, unix.EROFS) || errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
			hint = ": use mode r, or make it writable"
		}
		return nil, model.Target{}, fmt.Errorf("params %q: cannot open %s for %s: %w%s", q(params), q(p), how, err, hint)
	}
	return os.NewFile(uintptr(fd), p), target, nil
}

func fileType(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFIFO:
		return "FIFO"
	case unix.S_IFCHR:
		return "character device"
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFLNK:
		return "symbolic link"
	}
	return "special file"
}

func q(s string) string { return model.Quote(s, 200) }

// mountPoint returns where rdev is mounted according to mountinfo ("" if it
// is not). Field 3 is "major:minor" in decimal (proc(5)).
func mountPoint(mountinfo string, rdev uint64) (string, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return "", fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	want := strconv.FormatUint(uint64(unix.Major(rdev)), 10) + ":" + strconv.FormatUint(uint64(unix.Minor(rdev)), 10)
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && fields[2] == want {
			return fields[4], nil
		}
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read %s: %w", mountinfo, err)
	}
	return "", nil
}
