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

	"xenblkd/internal/loop"
	"xenblkd/internal/model"
	"xenblkd/internal/text"
)

// openTarget opens params with the access mode asks for and decides by fstat
// of the opened fd what it is, so nothing can be swapped between check and
// use. It first opens with O_PATH: that never blocks (a FIFO) and has no side
// effects (a tape or tty), then re-opens the same inode through /proc/self/fd
// only once it is known to be a block device or a regular file.
func openTarget(params string, writable bool) (*os.File, model.Target, error) {
	p := params
	if !filepath.IsAbs(p) {
		// As the stock script treats phy:sdb, but never out of /dev.
		for _, elem := range strings.Split(p, "/") {
			if elem == ".." {
				return nil, model.Target{}, fmt.Errorf("params %q: a relative params names a node under /dev and may not contain \"..\"; give the absolute path", text.Truncate(params, 200))
			}
		}
		p = "/dev/" + p
	}
	pathFd, err := unix.Open(p, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			if !filepath.IsAbs(params) {
				return nil, model.Target{}, &notFoundError{fmt.Sprintf("params %q: no such device %s (a relative params names a node under /dev)", text.Truncate(params, 200), text.Truncate(p, 200))}
			}
			return nil, model.Target{}, &notFoundError{fmt.Sprintf("params %q: no such file or device", text.Truncate(params, 200))}
		}
		return nil, model.Target{}, fmt.Errorf("params %q: open %s: %w", text.Truncate(params, 200), text.Truncate(p, 200), err)
	}
	defer unix.Close(pathFd)
	var st unix.Stat_t
	if err := unix.Fstat(pathFd, &st); err != nil {
		return nil, model.Target{}, fmt.Errorf("params %q: stat: %w", text.Truncate(params, 200), err)
	}
	target, err := targetOf(params, p, &st, writable)
	if err != nil {
		return nil, model.Target{}, err
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
		return nil, model.Target{}, fmt.Errorf("params %q: cannot open %s for %s: %w%s", text.Truncate(params, 200), text.Truncate(p, 200), how, err, hint)
	}
	f := os.NewFile(uintptr(fd), p)
	if target.Kind == model.BlockDevice {
		if err := blockFacts(f, &target, "/sys"); err != nil {
			f.Close()
			return nil, model.Target{}, fmt.Errorf("params %q: %w", text.Truncate(params, 200), err)
		}
	}
	return f, target, nil
}

// targetOf says what the node p (params, resolved) with status st is, and
// refuses what cannot be attached with mode's access.
func targetOf(params, p string, st *unix.Stat_t, writable bool) (model.Target, error) {
	target := model.Target{Path: p}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		target.Kind, target.Rdev = model.BlockDevice, st.Rdev
	case unix.S_IFREG:
		target.Kind, target.File = model.RegularFile, model.FileID{Dev: st.Dev, Ino: st.Ino}
		if st.Nlink == 0 {
			// e.g. /proc/<pid>/fd/<n> of a deleted image: nothing else could
			// ever find it to check sharing, and its data dies with the last fd.
			return model.Target{}, fmt.Errorf("params %q: the file has been deleted (no name links to it any more); restore it under a name and use that", text.Truncate(params, 200))
		}
		// A 0-byte file is attached read-only only: libxl (4.19+) passes an
		// empty CD-ROM drive as one (mode r), while a read-write disk of 0
		// bytes holds nothing and is an image never written (loop.fileID).
		if writable && st.Size == 0 {
			return model.Target{}, fmt.Errorf("params %q: the file is empty (0 bytes) but mode is w: a read-write disk needs an image with data (an empty file is attached with mode r only, as an empty CD-ROM)", text.Truncate(params, 200))
		}
		if writable && st.Mode&0o222 == 0 {
			return model.Target{}, fmt.Errorf("params %q: the file is read-only (permissions %#o) but mode is w: use mode r, or make the file writable",
				text.Truncate(params, 200), st.Mode&0o7777)
		}
	default:
		return model.Target{}, fmt.Errorf("params %q is a %s: expected a block device or a regular image file", text.Truncate(params, 200), fileType(st.Mode))
	}
	return target, nil
}

// blockFacts fills in what the block device open on f stands for: the file
// bound to it if it is a loop device (refused if nothing is), its whole disk
// if it is a partition, its partitions if it has any (from sysfs).
func blockFacts(f *os.File, t *model.Target, sysfs string) error {
	if unix.Major(t.Rdev) == loop.Major {
		b, err := loop.BindingOf(f)
		if errors.Is(err, loop.ErrNotBound) {
			return fmt.Errorf("loop device %s has no file bound to it, so the guest would get an empty disk; bind one (losetup %s FILE) or name the file itself", t.Path, t.Path)
		}
		if err != nil {
			return err
		}
		t.Backing = model.FileID{Dev: b.Backing.Dev, Ino: b.Backing.Ino}
		dir := fmt.Sprintf("%s/dev/block/%d:%d", sysfs, unix.Major(t.Rdev), unix.Minor(t.Rdev))
		if name, err := os.ReadFile(dir + "/loop/backing_file"); err == nil {
			t.BackingPath = strings.TrimSpace(string(name))
		}
	}
	dir := fmt.Sprintf("%s/dev/block/%d:%d", sysfs, unix.Major(t.Rdev), unix.Minor(t.Rdev))
	if _, err := os.Stat(dir + "/partition"); err == nil {
		whole, err := readDevNumber(dir + "/../dev")
		if err != nil {
			return fmt.Errorf("find the whole disk of partition %s: %w", t.Path, err)
		}
		t.Whole = whole
		return nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read %s: %w", dir, err)
	}
	// A partition's directory is named after its disk (sdb1, loop0p1,
	// nvme0n1p1): only those are worth a stat.
	link, err := os.Readlink(dir)
	if err != nil {
		return fmt.Errorf("read %s: %w", dir, err)
	}
	disk := filepath.Base(link)
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), disk) {
			continue
		}
		if _, err := os.Stat(dir + "/" + e.Name() + "/partition"); err != nil {
			continue
		}
		part, err := readDevNumber(dir + "/" + e.Name() + "/dev")
		if err != nil {
			return fmt.Errorf("find the partitions of %s: %w", t.Path, err)
		}
		t.Partitions = append(t.Partitions, part)
	}
	return nil
}

// readDevNumber reads a sysfs dev file ("major:minor").
func readDevNumber(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	maj, min, ok := strings.Cut(strings.TrimSpace(string(b)), ":")
	ma, err1 := strconv.ParseUint(maj, 10, 32)
	mi, err2 := strconv.ParseUint(min, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return 0, fmt.Errorf("%s: malformed device number %q", path, b)
	}
	return unix.Mkdev(uint32(ma), uint32(mi)), nil
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

// mounts returns the mounts of the devices devs according to mountinfo
// (proc(5)): field 3 is "major:minor" in decimal, field 5 the mount point,
// field 6 the per-mount options (ro or rw first), and after the "-" separator
// come the filesystem type and the source.
func mounts(mountinfo string, devs []uint64) ([]model.Mount, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	want := make(map[string]uint64, len(devs))
	for _, d := range devs {
		want[strconv.FormatUint(uint64(unix.Major(d)), 10)+":"+strconv.FormatUint(uint64(unix.Minor(d)), 10)] = d
	}
	var out []model.Mount
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 {
			continue
		}
		d, ok := want[fields[2]]
		if !ok {
			continue
		}
		mt := model.Mount{Rdev: d, Point: unescapeMount(fields[4]), ReadOnly: strings.HasPrefix(fields[5], "ro")}
		for i, fl := range fields {
			if fl == "-" && i+2 < len(fields) {
				mt.Source = unescapeMount(fields[i+2])
				break
			}
		}
		out = append(out, mt)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", mountinfo, err)
	}
	return out, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
