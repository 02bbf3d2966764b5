package loop

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// fsNoCOWFlag is FS_NOCOW_FL (include/uapi/linux/fs.h), which x/sys/unix
// does not define: `chattr +C`. On Btrfs it also turns data checksums off.
const fsNoCOWFlag = 0x00800000

// BackingInfo is what an I/O policy needs to know about a backing file
// before asking for direct I/O. InspectBacking reads it.
type BackingInfo struct {
	// FSType is statfs's f_type of the file system holding a regular file
	// (unix.EXT4_SUPER_MAGIC, unix.XFS_SUPER_MAGIC, ...); 0 for a block device.
	FSType int64
	// DirectIOAlign is the smallest logical block size at which the kernel
	// lets a loop device do direct I/O to this file; 0 if the file system
	// says it cannot do direct I/O at all.
	DirectIOAlign uint32
	// NoCOW: the file has FS_NOCOW_FL (on Btrfs: no copy-on-write and no
	// data checksums).
	NoCOW bool
}

// InspectBacking reads f's file system type, direct-I/O alignment and
// NOCOW attribute, the way the kernel's loop driver will see them.
func InspectBacking(f *os.File) (BackingInfo, error) {
	fd := int(f.Fd())
	defer runtime.KeepAlive(f) // fd must stay open while we use it
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return BackingInfo{}, &OpError{Op: "inspect backing file", Dev: f.Name(), Err: err}
	}
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		bs, err := unix.IoctlGetInt(fd, unix.BLKSSZGET)
		if err != nil {
			return BackingInfo{}, &OpError{Op: "inspect backing file", Dev: f.Name(), Err: fmt.Errorf("get logical block size: %w", err)}
		}
		return BackingInfo{DirectIOAlign: uint32(bs)}, nil
	}
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return BackingInfo{}, &OpError{Op: "inspect backing file", Dev: f.Name(), Err: err}
	}
	info := BackingInfo{FSType: sfs.Type, DirectIOAlign: fileDIOAlign(fd)}
	// FS_IOC_GETFLAGS copies an int despite its long in the ioctl number;
	// file systems without attributes answer ENOTTY (or EINVAL): not NOCOW.
	if flags, err := unix.IoctlGetUint32(fd, unix.FS_IOC_GETFLAGS); err == nil {
		info.NoCOW = flags&fsNoCOWFlag != 0
	}
	return info, nil
}

// fileDIOAlign mirrors how the loop driver picks its minimum direct-I/O size
// (loop_query_min_dio_size, Linux 6.15 commit f4774e92aab8): the file
// system's statx STATX_DIOALIGN (6.1) if it reports one, else the logical
// block size of the device the file system is on, else 512. Kernels before
// 6.15 use only the device's logical block size, which for ext4 and XFS is
// the same number. A file system we cannot map to a device (Btrfs reports an
// anonymous st_dev) gets 512: if the kernel disagrees it refuses direct I/O,
// and settleIO reports the device buffered.
func fileDIOAlign(fd int) uint32 {
	var stx unix.Statx_t
	err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx)
	if err == nil && stx.Mask&unix.STATX_DIOALIGN != 0 {
		return stx.Dio_offset_align // 0: no direct I/O on this file
	}
	if err != nil || stx.Dev_major == 0 {
		return 512 // tmpfs, NFS, Btrfs: no block device to ask
	}
	dev := "/sys/dev/block/" + strconv.FormatUint(uint64(stx.Dev_major), 10) + ":" + strconv.FormatUint(uint64(stx.Dev_minor), 10)
	// A partition has no queue/ of its own: its disk's is one level up.
	for _, p := range []string{dev + "/queue/logical_block_size", dev + "/../queue/logical_block_size"} {
		if n, err := readSysUint(p); err == nil && n >= 512 {
			return uint32(n)
		}
	}
	return 512
}

// settleIO reads back the I/O mode the kernel gave a freshly configured
// device and makes it definite, so the Device reports what is in effect:
//
//   - The logical block size must be the one asked for (LOOP_CONFIGURE
//     always passes one: with block_size 0 and DIRECT_IO, Linux 6.15+ picks
//     the backing file's DIO alignment, commit f4774e92aab8 and its fix
//     "loop: check in LO_FLAGS_DIRECT_IO in loop_default_blocksize", which
//     turns a 4Kn-backed guest disk into 4096-byte sectors behind its back).
//   - Direct I/O counts only if lo_flags and /sys/block/loopN/loop/dio both
//     say so. LOOP_CONFIGURE succeeds but drops DIRECT_IO when the file
//     cannot do O_DIRECT at the device's block size (__loop_update_dio since
//     4.4, commit 2e5ab5f379f9; lo_can_use_dio in later kernels): e.g. 512-byte
//     sectors on a file system on a 4096-byte disk, or tmpfs before 6.6
//     (commit e88e0d366f9c). That device is buffered, and correct.
//   - A device that does direct I/O although it was not asked to (the kernel
//     also turns it on for an O_DIRECT backing fd), or whose two reports
//     disagree, is switched to buffered with LOOP_SET_DIRECT_IO(0).
func settleIO(fd int, b Binding, opts Options) (Binding, ioMode, error) {
	want := opts.BlockSize
	if want == 0 {
		want = 512
	}
	bs, err := unix.IoctlGetInt(fd, unix.BLKSSZGET)
	if err != nil {
		return b, ioMode{}, fmt.Errorf("get logical block size: %w", err)
	}
	if uint32(bs) != want {
		return b, ioMode{}, fmt.Errorf("logical block size is %d, want %d", bs, want)
	}
	flagDIO, sysDIO := dioState(b)
	switch {
	case flagDIO && sysDIO && opts.DirectIO:
		return b, ioMode{directIO: true, blockSize: want}, nil
	case !flagDIO && !sysDIO:
		return b, ioMode{blockSize: want}, nil // buffered, as asked or as the kernel decided
	}
	if err := unix.IoctlSetInt(fd, unix.LOOP_SET_DIRECT_IO, 0); err != nil {
		return b, ioMode{}, fmt.Errorf("turn direct I/O off: %w", err)
	}
	if b, err = readBinding(fd, b.Path); err != nil {
		return b, ioMode{}, err
	}
	if flagDIO, sysDIO = dioState(b); flagDIO || sysDIO {
		return b, ioMode{}, fmt.Errorf("direct I/O still on after LOOP_SET_DIRECT_IO(0) (lo_flags %#x)", b.Flags)
	}
	return b, ioMode{blockSize: want}, nil
}

// readIOMode reads the I/O mode of a device someone else configured (an
// adopted or re-opened device), without changing it.
func readIOMode(fd int, b Binding) (ioMode, error) {
	bs, err := unix.IoctlGetInt(fd, unix.BLKSSZGET)
	if err != nil {
		return ioMode{}, fmt.Errorf("get logical block size: %w", err)
	}
	flagDIO, sysDIO := dioState(b)
	return ioMode{directIO: flagDIO && sysDIO, blockSize: uint32(bs)}, nil
}

// dioState returns direct I/O as lo_flags and as sysfs report it. Without
// sysfs (not mounted in a container) lo_flags are all there is.
func dioState(b Binding) (flags, sysfs bool) {
	flags = b.Flags&unix.LO_FLAGS_DIRECT_IO != 0
	n, err := readSysUint("/sys/block/loop" + strconv.Itoa(b.Number) + "/loop/dio")
	if err != nil {
		return flags, flags
	}
	return flags, n == 1
}

func readSysUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(string(bytes.TrimSpace(b)), 10, 64)
	if err != nil {
		return 0, errors.New(path + ": " + err.Error())
	}
	return n, nil
}
