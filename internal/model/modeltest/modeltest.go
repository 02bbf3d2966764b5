// Package modeltest is a fake machine behind model.Host, for the model's
// and the daemon's fast tests: loop devices bound to files (ours, and
// someone else's), which stay bound after their last close while something
// still holds them, mounts, and a device whose identity changes under us. It
// makes no ioctls; the real machine is tested against the real kernel.
package modeltest

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"xenblkd/internal/loop"
	"xenblkd/internal/model"
)

// Host is a fake model.Host. The zero value is ready to use: its devices
// are /dev/loop1, /dev/loop2, ... with diskseq 101, 102, ...
type Host struct {
	// First is the number before the first device's (0: /dev/loop1 first).
	First int
	// File is the file a device is bound to when NewLoop gets no backing
	// file (the model's tests pass none); with one, its st_dev and st_ino.
	File model.FileID
	// Linger is how many lookups (LoopsOf) a device of ours stays bound for
	// after its last close, as when udev's probe or xen-blkback still holds
	// it; < 0: forever.
	Linger int

	mu      sync.Mutex
	made    []*Device                // guarded by mu
	foreign []foreignBinding         // guarded by mu
	mounts  map[uint64][]model.Mount // guarded by mu
	lookups int                      // guarded by mu: LoopsOf calls
	skipped []string                 // guarded by mu: paths LoopsOf was told are held
}

type foreignBinding struct {
	file model.FileID
	b    model.Binding
}

// Device is a fake loop device of ours.
type Device struct {
	h        *Host
	n        int
	seq      uint64 // its diskseq when made (or claimed)
	file     model.FileID
	readOnly bool
	diskseq  uint64 // guarded by h.mu: changes when the device is reused (Reuse)
	closed   bool   // guarded by h.mu
	lingered int    // guarded by h.mu: lookups that found it bound after its close
}

func (d *Device) Path() string      { return fmt.Sprintf("/dev/loop%d", d.n) }
func (d *Device) Rdev() uint64      { return unix.Mkdev(loop.Major, uint32(d.n)) }
func (d *Device) DirectIO() bool    { return d.n%2 == 0 }
func (d *Device) BlockSize() uint32 { return 512 }
func (d *Device) ReadOnly() bool    { return d.readOnly }

// Backing is the file the device is bound to.
func (d *Device) Backing() model.FileID { return d.file }

// DiskSeq is the diskseq the device had when made: a handle's identity does
// not follow the device.
func (d *Device) DiskSeq() uint64 { return d.seq }

// Verify fails once the device was reused (Reuse).
func (d *Device) Verify() error {
	d.h.mu.Lock()
	defer d.h.mu.Unlock()
	if d.diskseq != d.DiskSeq() {
		return fmt.Errorf("%s has diskseq %d now, not %d", d.Path(), d.diskseq, d.DiskSeq())
	}
	return nil
}

// Close lets go of the device; it stays bound while Linger says.
func (d *Device) Close() error {
	d.h.mu.Lock()
	defer d.h.mu.Unlock()
	if d.closed {
		return errors.New("closed twice")
	}
	d.closed = true
	return nil
}

// NewLoop binds a new device to backing's file (or File).
func (h *Host) NewLoop(backing *os.File, readOnly bool) (model.Device, error) {
	file := h.File
	if backing != nil {
		var st unix.Stat_t
		if err := unix.Fstat(int(backing.Fd()), &st); err != nil {
			return nil, err
		}
		file = model.FileID{Dev: st.Dev, Ino: st.Ino}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	n := h.First + len(h.made) + 1
	d := &Device{h: h, n: n, seq: uint64(100 + n - h.First), file: file, readOnly: readOnly}
	d.diskseq = d.seq
	h.made = append(h.made, d)
	return d, nil
}

// Reopen opens device number of ours again (a daemon restarted: its fds
// are gone, the device is not) if it still has diskseq.
func (h *Host) Reopen(number int, diskseq uint64) (*Device, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, d := range h.made {
		if d.n == number && d.diskseq == diskseq && h.boundLocked(d) {
			d.closed = false
			return d, nil
		}
	}
	return nil, fmt.Errorf("/dev/loop%d with diskseq %d: no such device", number, diskseq)
}

// Claim makes device number, someone else's bound to file (Bind), one of
// ours (the stock script's device, adopted).
func (h *Host) Claim(number int, file model.FileID) (*Device, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, f := range h.foreign {
		if f.file != file || f.b.Rdev != unix.Mkdev(loop.Major, uint32(number)) {
			continue
		}
		h.foreign = append(h.foreign[:i:i], h.foreign[i+1:]...)
		d := &Device{h: h, n: number, seq: f.b.DiskSeq, diskseq: f.b.DiskSeq, file: file}
		h.made = append(h.made, d)
		return d, nil
	}
	return nil, fmt.Errorf("/dev/loop%d is not bound to file %d:%d", number, file.Dev, file.Ino)
}

// LoopsOf lists every device bound to file, ours (tagged xenblkd:) and
// someone else's, asking held first as the real host does.
func (h *Host) LoopsOf(file model.FileID, held func(path string) bool) ([]model.Binding, error) {
	h.mu.Lock()
	h.lookups++
	var bound []model.Binding
	for _, d := range h.made {
		if d.file != file || !h.boundLocked(d) {
			continue
		}
		tag, ours := "xenblkd:", true
		if d.diskseq != d.DiskSeq() {
			tag, ours = "reused", false
		}
		bound = append(bound, model.Binding{Path: d.Path(), Rdev: d.Rdev(), DiskSeq: d.diskseq, Tag: tag, Ours: ours})
	}
	for _, f := range h.foreign {
		if f.file == file {
			bound = append(bound, f.b)
		}
	}
	h.mu.Unlock()
	var out []model.Binding
	for _, b := range bound {
		if held(b.Path) {
			h.mu.Lock()
			h.skipped = append(h.skipped, b.Path)
			h.mu.Unlock()
			continue
		}
		out = append(out, b)
	}
	return out, nil
}

// boundLocked reports whether d is bound, counting a lookup of a closed one.
func (h *Host) boundLocked(d *Device) bool {
	switch {
	case !d.closed:
		return true
	case h.Linger < 0 || d.lingered < h.Linger:
		d.lingered++
		return true
	}
	return false
}

// Mounts returns the mounts of devs (Mount).
func (h *Host) Mounts(devs []uint64) ([]model.Mount, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []model.Mount
	for _, d := range devs {
		out = append(out, h.mounts[d]...)
	}
	return out, nil
}

// Bind binds someone else's loop device b to file.
func (h *Host) Bind(file model.FileID, b model.Binding) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.foreign = append(h.foreign, foreignBinding{file, b})
}

// Unbind frees every device of someone else's.
func (h *Host) Unbind() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.foreign = nil
}

// Mount mounts device rdev (mt.Rdev is set to it).
func (h *Host) Mount(rdev uint64, mt model.Mount) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.mounts == nil {
		h.mounts = map[uint64][]model.Mount{}
	}
	mt.Rdev = rdev
	h.mounts[rdev] = append(h.mounts[rdev], mt)
}

// Reuse makes device path (one of ours) another device: freed and bound
// again under the same number, so its diskseq changes and Verify fails.
func (h *Host) Reuse(path string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, d := range h.made {
		if d.Path() == path {
			d.diskseq += 1000
		}
	}
}

// Open is how many devices of ours are made and not closed.
func (h *Host) Open() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, d := range h.made {
		if !d.closed {
			n++
		}
	}
	return n
}

// Made is how many devices of ours were made.
func (h *Host) Made() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.made)
}

// Lookups is how many times LoopsOf was asked; ResetLookups starts again.
func (h *Host) Lookups() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lookups
}

func (h *Host) ResetLookups() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.lookups, h.skipped = 0, nil
}

// Skipped are the paths LoopsOf was told are held, since ResetLookups.
func (h *Host) Skipped() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.skipped...)
}
