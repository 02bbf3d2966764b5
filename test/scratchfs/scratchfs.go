// Package scratchfs makes throw-away file systems for tests and benchmarks:
// an image file, a loop device made by xenblkd's own loop package (with a
// 512- or 4096-byte logical block size, the latter standing in for a 4Kn
// disk or dm-crypt with 4096-byte sectors), mkfs, and a mount on a private
// directory. tmpfs is mounted directly. Close undoes all of it; nothing
// outside the given directory is touched.
package scratchfs

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/loop"
)

// Kinds are the file systems Make knows, in the order tests try them.
var Kinds = []string{"ext4", "xfs", "btrfs", "tmpfs"}

// mkfs is the command that formats each kind, quietly, without discarding
// the fresh device (a sparse image is all holes already).
var mkfs = map[string][]string{
	"ext4":  {"mkfs.ext4", "-q", "-F", "-E", "nodiscard"},
	"xfs":   {"mkfs.xfs", "-q", "-f", "-K"},
	"btrfs": {"mkfs.btrfs", "-q", "-f", "-K"},
}

// MinSize is the smallest image Make accepts for each kind (mkfs.xfs
// refuses file systems below 300 MiB since xfsprogs 5.19).
var MinSize = map[string]int64{"ext4": 32 << 20, "xfs": 300 << 20, "btrfs": 128 << 20, "tmpfs": 1 << 20}

// FS is a mounted scratch file system.
type FS struct {
	Kind       string
	Dir        string       // where it is mounted
	SectorSize uint32       // logical block size of the device under it (0 for tmpfs)
	Device     *loop.Device // nil for tmpfs
	image      string
}

// Available says why kind cannot be made here, or nil.
func Available(kind string) error {
	fss, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return err
	}
	if !strings.Contains(string(fss), "\t"+kind+"\n") {
		return fmt.Errorf("kernel has no %s (not in /proc/filesystems)", kind)
	}
	if cmd, ok := mkfs[kind]; ok {
		if _, err := exec.LookPath(cmd[0]); err != nil {
			return fmt.Errorf("%s not installed (scripts/setup.sh installs it)", cmd[0])
		}
	}
	return nil
}

// Make creates a kind file system of size bytes under dir (which must be
// private to the caller), on a loop device with sectorSize-byte sectors.
func Make(dir, kind string, size int64, sectorSize uint32) (*FS, error) {
	if err := Available(kind); err != nil {
		return nil, err
	}
	size = max(size, MinSize[kind])
	fs := &FS{Kind: kind, Dir: filepath.Join(dir, kind+"-mnt")}
	if err := os.MkdirAll(fs.Dir, 0o700); err != nil {
		return nil, err
	}
	if kind == "tmpfs" {
		if err := unix.Mount("tmpfs", fs.Dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
			return nil, fmt.Errorf("mount tmpfs on %s: %w", fs.Dir, err)
		}
		return fs, nil
	}
	fs.SectorSize = max(sectorSize, 512)
	fs.image = filepath.Join(dir, kind+".img")
	if err := os.WriteFile(fs.image, nil, 0o600); err != nil {
		return nil, err
	}
	if err := os.Truncate(fs.image, size); err != nil {
		os.Remove(fs.image)
		return nil, err
	}
	backing, err := loop.OpenBacking(fs.image, false)
	if err != nil {
		os.Remove(fs.image)
		return nil, err
	}
	// Direct I/O where the host allows it, so the scratch file system's own
	// image does not sit in the host's page cache and blur what a benchmark
	// measures one level up.
	fs.Device, err = loop.Attach(backing, loop.Options{BlockSize: fs.SectorSize, DirectIO: true,
		Tag: fmt.Sprintf("xenblkd-scratch:%d", os.Getpid())})
	backing.Close()
	if err != nil {
		os.Remove(fs.image)
		return nil, err
	}
	args := append(append([]string{}, mkfs[kind][1:]...), fs.Device.Path())
	if out, err := exec.Command(mkfs[kind][0], args...).CombinedOutput(); err != nil {
		fs.Close()
		return nil, fmt.Errorf("%s: %v: %s", mkfs[kind][0], err, out)
	}
	if err := unix.Mount(fs.Device.Path(), fs.Dir, kind, 0, ""); err != nil {
		fs.Close()
		return nil, fmt.Errorf("mount %s (%s) on %s: %w", fs.Device.Path(), kind, fs.Dir, err)
	}
	return fs, nil
}

// Close unmounts the file system, releases its loop device and removes
// its image.
func (fs *FS) Close() error {
	var errs []error
	for try := 0; ; try++ {
		err := unix.Unmount(fs.Dir, 0)
		if err == nil || err == unix.EINVAL || err == unix.ENOENT { // EINVAL: not mounted
			break
		}
		if err != unix.EBUSY || try == 50 {
			errs = append(errs, fmt.Errorf("unmount %s: %w", fs.Dir, err))
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if fs.Device != nil {
		errs = append(errs, fs.Device.Close())
	}
	if fs.image != "" {
		errs = append(errs, os.Remove(fs.image))
	}
	return errors.Join(errs...)
}

// SetNoCOW creates path empty with FS_NOCOW_FL (chattr +C), which on Btrfs
// must be set before the file has data; the caller then sizes it.
func SetNoCOW(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	flags, err := unix.IoctlGetUint32(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err != nil {
		return fmt.Errorf("get attributes of %s: %w", path, err)
	}
	return unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, int(flags|0x00800000))
}
