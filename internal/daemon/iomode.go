package daemon

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"xenblkd/internal/loop"
)

// DirectIO is the --direct-io setting: whether loop devices read and write
// their image files with direct I/O (bypassing dom0's page cache).
type DirectIO string

const (
	// DirectIOAuto: direct I/O on the file systems where it was measured to
	// help and is safe (docs/benchmarks.md): ext4, XFS, and Btrfs files
	// without data checksums (NOCOW). Buffered elsewhere.
	DirectIOAuto DirectIO = "auto"
	DirectIOOn   DirectIO = "on"  // wherever the kernel allows it
	DirectIOOff  DirectIO = "off" // always buffered, as the stock block script
)

// ParseDirectIO parses auto, on or off.
func ParseDirectIO(s string) (DirectIO, error) {
	switch d := DirectIO(s); d {
	case DirectIOAuto, DirectIOOn, DirectIOOff:
		return d, nil
	}
	return "", fmt.Errorf("direct I/O setting %q: expected auto, on or off", s)
}

// The per-disk overrides, extended attributes of the image file
// (setfattr -n user.xenblkd.direct-io -v off IMAGE). They win over the
// daemon's --direct-io; the block size has no daemon-wide setting, because
// changing an existing guest disk's sector size breaks its partition table.
const (
	xattrDirectIO  = "user.xenblkd.direct-io"  // auto, on or off
	xattrBlockSize = "user.xenblkd.block-size" // 512 or 4096 (any power of two 512..65536)
)

// IOPolicy says how the daemon chooses the I/O mode of a new loop device.
type IOPolicy struct {
	DirectIO DirectIO // "" means auto
}

// diskIO is a disk's own settings, from its image's extended attributes.
type diskIO struct {
	DirectIO  DirectIO // "" if not set
	BlockSize uint32   // 0 if not set: 512
}

// ioChoice is what chooseIO decided, and why (one log line).
type ioChoice struct {
	DirectIO  bool
	BlockSize uint32
	Reason    string
}

// Btrfs checksums data. Direct writes of pages the guest still modifies in
// flight (Xen guests do) store a checksum that does not match the data:
// "csum failed" read errors later (Qubes turned loop direct I/O off for this,
// QubesOS/qubes-issues#9488). Linux 6.14 (commit 968f19c5b1b7) makes Btrfs
// turn such direct writes into buffered ones, so direct I/O then no longer
// keeps dom0's page cache clear anyway. Files with NOCOW (chattr +C) have no
// data checksums: direct I/O is safe there.
const btrfsChecksumReason = "btrfs checksums this file's data: direct writes of pages the guest changes in flight fail their checksum later (before Linux 6.14) or are made buffered by btrfs (6.14+); chattr +C (NOCOW, before the image has data) allows direct I/O"

// chooseIO decides a new loop device's I/O mode from the daemon's policy,
// the disk's own settings (which win) and the image file's facts. Pure.
func chooseIO(p IOPolicy, disk diskIO, info loop.BackingInfo) ioChoice {
	c := ioChoice{BlockSize: 512}
	if disk.BlockSize != 0 {
		c.BlockSize = disk.BlockSize
	}
	mode, from := p.DirectIO, "--direct-io"
	if mode == "" {
		mode = DirectIOAuto
	}
	if disk.DirectIO != "" {
		mode, from = disk.DirectIO, xattrDirectIO
	}
	switch mode {
	case DirectIOOff:
		c.Reason = fmt.Sprintf("%s=off", from)
		return c
	case DirectIOOn:
		c.DirectIO, c.Reason = true, fmt.Sprintf("%s=on", from)
		if info.FSType == unix.BTRFS_SUPER_MAGIC && !info.NoCOW {
			c.Reason += "; warning: " + btrfsChecksumReason
		}
	default:
		c.DirectIO, c.Reason = autoDirectIO(info)
		c.Reason = fmt.Sprintf("%s=auto: %s", from, c.Reason)
	}
	if !c.DirectIO {
		return c
	}
	switch {
	case info.DirectIOAlign == 0:
		c.DirectIO, c.Reason = false, c.Reason+"; but the file system cannot do direct I/O on this file"
	case info.DirectIOAlign > c.BlockSize:
		// Direct I/O would need the guest to see bigger sectors than it was
		// given; the guest's disk layout wins (Qubes learnt this on 4Kn disks).
		c.DirectIO, c.Reason = false, fmt.Sprintf(
			"%s; but direct I/O needs %d-byte sectors here (a 4Kn disk or dm-crypt below) and the guest keeps %d-byte sectors: buffered (set %s=%d on the image to use direct I/O)",
			c.Reason, info.DirectIOAlign, c.BlockSize, xattrBlockSize, info.DirectIOAlign)
	}
	return c
}

// autoDirectIO is the per-file-system default (docs/benchmarks.md has the
// measurements behind it).
func autoDirectIO(info loop.BackingInfo) (bool, string) {
	switch info.FSType {
	case unix.EXT4_SUPER_MAGIC: // also ext2 and ext3, same magic and driver
		return true, "ext4: direct I/O keeps the image out of dom0's page cache (make bench-io)"
	case unix.XFS_SUPER_MAGIC:
		return true, "xfs: direct I/O keeps the image out of dom0's page cache (make bench-io)"
	case unix.BTRFS_SUPER_MAGIC:
		if info.NoCOW {
			return true, "btrfs NOCOW file (no data checksums): direct I/O is safe"
		}
		return false, btrfsChecksumReason
	case unix.TMPFS_MAGIC:
		return false, "tmpfs: the image lives in memory anyway, direct I/O saves no page cache"
	}
	return false, fmt.Sprintf("file system type %#x not measured: buffered", info.FSType)
}

// readDiskIO reads the image's per-disk overrides. A value that is set but
// wrong is an error: the admin asked for something, guessing is worse.
func readDiskIO(f *os.File) (diskIO, error) {
	var d diskIO
	if v, ok, err := getXattr(f, xattrDirectIO); err != nil {
		return d, err
	} else if ok {
		if d.DirectIO, err = ParseDirectIO(v); err != nil {
			return d, fmt.Errorf("%s: %s %w", f.Name(), xattrDirectIO, err)
		}
	}
	if v, ok, err := getXattr(f, xattrBlockSize); err != nil {
		return d, err
	} else if ok {
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil || n < 512 || n > 65536 || n&(n-1) != 0 {
			return d, fmt.Errorf("%s: %s=%q: expected 512, 1024, 2048 or 4096 (a power of two up to 65536)", f.Name(), xattrBlockSize, v)
		}
		d.BlockSize = uint32(n)
	}
	return d, nil
}

// getXattr reads one extended attribute of f; ok is false when the file
// has none by that name or its file system has no xattrs at all.
func getXattr(f *os.File, name string) (string, bool, error) {
	buf := make([]byte, 64)
	n, err := unix.Fgetxattr(int(f.Fd()), name, buf)
	switch {
	case errors.Is(err, unix.ENODATA), errors.Is(err, unix.ENOTSUP):
		return "", false, nil
	case errors.Is(err, unix.ERANGE):
		return "", false, fmt.Errorf("%s: %s is longer than 64 bytes", f.Name(), name)
	case err != nil:
		return "", false, fmt.Errorf("%s: read %s: %w", f.Name(), name, err)
	}
	return string(buf[:n]), true, nil
}
