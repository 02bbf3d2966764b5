// Package loop drives the Linux loop-device API safely: one LOOP_CONFIGURE
// with AUTOCLEAR, a held fd, diskseq-checked identity. It knows nothing of
// Xen or of policy.
//
// # Attach, step by step
//
//  1. Check the input: the backing fd must be a non-empty regular file or
//     block device, open for reading, and open read-write unless a read-only
//     device is asked for (the kernel would otherwise silently force
//     READ_ONLY); the tag must fit lo_file_name (63 bytes) and the block size
//     be valid. So an EINVAL from LOOP_CONFIGURE can only mean "kernel < 5.8".
//  2. flock(LOCK_EX) on /dev/loop-control, as systemd does: cooperating
//     allocators never race for the device LOOP_CTL_GET_FREE hands out.
//  3. LOOP_CTL_GET_FREE (the first unbound device; created if none).
//  4. Open /dev/loopN O_RDWR, or O_RDONLY for a read-only device, O_CLOEXEC.
//  5. One LOOP_CONFIGURE: AUTOCLEAR always, READ_ONLY and DIRECT_IO as asked,
//     block size 512 unless asked, never PARTSCAN, lo_file_name = tag.
//  6. Drop the lock; read LOOP_GET_STATUS64, BLKGETDISKSEQ and fstat on the
//     held fd, and verify: backing st_dev/st_ino as fstat'ed before, AUTOCLEAR
//     set, READ_ONLY as asked, tag as given. On mismatch LOOP_CLR_FD + close
//     (the device is ours and may lack AUTOCLEAR) and try again.
//  7. Settle the I/O mode (dio_linux.go): the logical block size (BLKSSZGET)
//     must be the one asked for; direct I/O is in effect only if lo_flags and
//     /sys/block/loopN/loop/dio agree; a device doing direct I/O it was not
//     asked for is switched off with LOOP_SET_DIRECT_IO(0). Device.DirectIO
//     and Device.BlockSize report the result.
//
// Failures of a per-device step with EBUSY (an allocator outside our lock,
// e.g. losetup, configured the device first, or someone holds it O_EXCL),
// ENXIO (device in rundown), ENOENT (node removed) or EAGAIN are retried up
// to 64 times with a jittered backoff below 6.4 ms. After two EBUSY in a row
// on the same index the next attempt uses LOOP_CTL_ADD(-1), a brand-new
// device, because GET_FREE would keep returning the unusable one.
//
// # Kernel quirks this package relies on or works around
//
//   - LOOP_CONFIGURE exists since 5.8 (commit 3448914e8cc5). Before, lo_ioctl
//     answers EINVAL (ENOTTY/ENOSYS under some compat layers); only then do we
//     fall back to LOOP_SET_FD + LOOP_SET_STATUS64 (+ LOOP_SET_DIRECT_IO,
//     LOOP_SET_BLOCK_SIZE). Between the first two ioctls the device is bound
//     without AUTOCLEAR: if the process dies there, it stays bound until
//     someone runs `losetup -d`. LOOP_SET_STATUS64 may return EAGAIN (5.0+,
//     commit 5db470e229e2) while udev has the device open: retried.
//   - AUTOCLEAR fires on the last close of the whole block device by anyone
//     (our fd, xen-blkback, udev's probe, a mount). So the owner holds its fd
//     for as long as the device is in use, and Close never calls LOOP_CLR_FD.
//   - diskseq (BLKGETDISKSEQ, 5.15) is bumped on every configure and clear;
//     (loopN, diskseq) names one binding. It is read on an open fd, never
//     from a path that may name a newer binding by now. Older kernels report
//     DiskSeq 0 and Open fails with ENOTTY.
//   - LOOP_CONFIGURE forces READ_ONLY when either the backing fd or the loop
//     fd is not writable.
//   - DIRECT_IO is silently dropped (LOOP_CONFIGURE still returns 0) when the
//     backing file cannot do O_DIRECT at the device's logical block size:
//     __loop_update_dio since 4.4 (commit 2e5ab5f379f9), lo_can_use_dio in
//     later kernels. Seen on 6.18 with 512-byte sectors on ext4 or XFS on a 4096-byte
//     disk. The legacy LOOP_SET_DIRECT_IO fails with EINVAL instead, and must
//     come after LOOP_SET_BLOCK_SIZE. InspectBacking tells the caller the
//     alignment beforehand, so a policy can choose instead of being surprised.
//   - With block_size 0 and DIRECT_IO, Linux 6.15+ (commit f4774e92aab8, and
//     "loop: check in LO_FLAGS_DIRECT_IO in loop_default_blocksize") gives
//     the device the backing file's DIO alignment as its sector size: a guest
//     on a 4Kn disk or 4096-byte dm-crypt would see 4096-byte sectors. We
//     always pass the size (512 unless asked).
//   - The kernel turns direct I/O on by itself for an O_DIRECT backing fd
//     (6.15+, loop_assign_backing_file; earlier via loop_update_dio).
//   - tmpfs has O_DIRECT only since 6.6 (commit e88e0d366f9c); before, direct
//     I/O on a tmpfs image is dropped as above.
//   - /sys/block/loopN/loop/ exists only while bound: List uses it to skip
//     unbound devices without opening them.
//
// Fds are raw ints, never *os.File: a finalizer closing a forgotten
// *os.File would autoclear the device under a running VM.
package loop
