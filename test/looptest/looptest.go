// Package looptest binds loop devices with losetup for tests and detaches
// exactly the binding it made, never whatever holds the same number later.
//
// A loop device's path names a slot, not a binding: once a binding is
// cleared (losetup -d, AUTOCLEAR), `losetup -f` anywhere on the host takes
// the lowest free slot again, so a second `losetup -d /dev/loopN` by a test
// that already detached its device (or whose device was cleared) detaches
// another test's disk, perhaps in another package running at the same time.
// Device remembers its binding's diskseq (which the kernel changes on every
// bind and clear) and Detach clears the slot only while it still carries
// that binding, checking and clearing through one open fd: while the fd is
// open nobody can clear and rebind the slot in between.
package looptest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// clearLimit bounds how long Detach waits for the kernel to clear a device:
// `losetup -d` of a device another opener still holds (a daemon under test,
// a probe) only marks it AUTOCLEAR, and the clear waits for that close.
const clearLimit = 30 * time.Second

// Device is one binding made by Bind.
type Device struct {
	Path    string // /dev/loopN, as losetup printed it
	Rdev    uint64
	DiskSeq uint64 // the binding's diskseq: what tells it from a later one

	once sync.Once
	err  error
}

// Bind runs `losetup [args] --show -f file` and identifies the binding it
// made by its diskseq, after checking through an open fd that the device is
// bound to file.
func Bind(file string, args ...string) (*Device, error) {
	cmd := append(args, "--show", "-f", file)
	out, err := exec.Command("losetup", cmd...).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("losetup %s: %v: %s", strings.Join(cmd, " "), err, out)
	}
	path := strings.TrimSpace(string(out))
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s, just bound to %s: %w", path, file, err)
	}
	defer f.Close()
	fd := int(f.Fd())
	var want, st unix.Stat_t
	if err := unix.Stat(file, &want); err != nil {
		return nil, err
	}
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil || info.Device != uint64(want.Dev) || info.Inode != want.Ino {
		// Not ours any more: cleared, perhaps bound again, by someone else.
		return nil, fmt.Errorf("%s is no longer bound to %s as losetup returned (LOOP_GET_STATUS64: %+v, %v)", path, file, info, err)
	}
	seq, err := unix.IoctlGetUint64(fd, unix.BLKGETDISKSEQ)
	if err == nil {
		err = unix.Fstat(fd, &st)
	}
	if err != nil {
		_ = unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0) // ours: cleared as f closes
		return nil, fmt.Errorf("%s: BLKGETDISKSEQ or fstat: %w", path, err)
	}
	return &Device{Path: path, Rdev: uint64(st.Rdev), DiskSeq: seq}, nil
}

// Losetup is Bind for a test: it fails tb on an error and detaches the
// device at cleanup (a no-op if the test detached it already).
func Losetup(tb testing.TB, file string, args ...string) *Device {
	tb.Helper()
	d, err := Bind(file, args...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := d.Detach(); err != nil {
			tb.Error(err)
		}
	})
	return d
}

// Detach detaches d as `losetup -d` does (the kernel clears it at the last
// close) if the device still carries d's binding, and waits until it is
// cleared. A binding that is gone already is left alone, whoever holds the
// slot now. Repeated calls return the first call's result.
func (d *Device) Detach() error {
	d.once.Do(func() { d.err = d.detach() })
	return d.err
}

func (d *Device) detach() error {
	f, err := os.OpenFile(d.Path, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENXIO) {
		return nil // the slot itself is gone
	}
	if err != nil {
		return fmt.Errorf("open %s to detach it: %w", d.Path, err)
	}
	seq, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETDISKSEQ)
	if err != nil {
		f.Close()
		return fmt.Errorf("BLKGETDISKSEQ %s: %w", d.Path, err)
	}
	if seq != d.DiskSeq {
		f.Close()
		return nil // cleared (and maybe rebound by someone else) meanwhile
	}
	err = unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
	f.Close() // with AUTOCLEAR set, this (or another opener's) close clears it
	if errors.Is(err, unix.ENXIO) {
		return nil // already unbound, nothing rebound yet
	}
	if err != nil {
		return fmt.Errorf("LOOP_CLR_FD %s: %w", d.Path, err)
	}
	for deadline := time.Now().Add(clearLimit); d.Bound(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			return fmt.Errorf("%s (diskseq %d) still bound %v after its detach: something keeps it open", d.Path, d.DiskSeq, clearLimit)
		}
	}
	return nil
}

// Bound reports whether the device still carries d's binding. It reads
// sysfs only: opening the device would make this test an opener that other
// tests' clears wait for.
func (d *Device) Bound() bool {
	sys := fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(d.Rdev), unix.Minor(d.Rdev))
	if _, err := os.Stat(sys + "/loop/backing_file"); err != nil {
		return false
	}
	b, err := os.ReadFile(sys + "/diskseq")
	return err == nil && strings.TrimSpace(string(b)) == strconv.FormatUint(d.DiskSeq, 10)
}

// HoldFree returns a loop device nothing is bound to, held open O_EXCL so
// that no one can bind it (LOOP_CONFIGURE claims the device exclusively and
// gets EBUSY) until release, which cleanup also runs. The index comes from
// LOOP_CTL_GET_FREE under the loop-control lock, which cooperating allocators
// (xenblkd, systemd) take; one that does not (losetup, another test binary)
// may bind or hold the device between GET_FREE and the open. The open does
// not fail on a device bound since, so the device is asked after it
// (LOOP_GET_STATUS64: ENXIO means unbound), and GET_FREE asked again,
// bounded by time.
func HoldFree(tb testing.TB) (index int, path string, release func()) {
	tb.Helper()
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		tb.Fatal(err)
	}
	defer unix.Close(ctl) // and its lock
	if err := unix.Flock(ctl, unix.LOCK_EX); err != nil {
		tb.Fatal(err)
	}
	for deadline := time.Now().Add(clearLimit); ; time.Sleep(time.Millisecond) {
		index, err = unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			tb.Fatalf("LOOP_CTL_GET_FREE: %v", err)
		}
		path = fmt.Sprintf("/dev/loop%d", index)
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
		if err == nil {
			if _, serr := unix.IoctlLoopGetStatus64(fd); errors.Is(serr, unix.ENXIO) {
				release = sync.OnceFunc(func() { unix.Close(fd) })
				tb.Cleanup(release)
				return index, path, release
			}
			unix.Close(fd)
			err = unix.EBUSY // bound since GET_FREE
		}
		if !errors.Is(err, unix.EBUSY) && !errors.Is(err, unix.ENOENT) {
			tb.Fatalf("open %s O_EXCL: %v", path, err)
		}
		if time.Now().After(deadline) {
			tb.Fatalf("no unbound loop device could be held within %v (last tried %s)", clearLimit, path)
		}
	}
}
