package daemon

import (
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"

	"xenblkd/internal/loop"
	"xenblkd/internal/model"
)

// loopHost is model.Host on the real machine.
type loopHost struct {
	tag       string      // lo_file_name of every device we make
	mountinfo string      // /proc/self/mountinfo
	io        IOPolicy    // how new devices do I/O (iomode.go)
	index     *loop.Index // loop devices by backing file; nil: scan every device
	log       *slog.Logger
	indexed   atomic.Bool // the index answers from memory (logged once)
}

// NewLoop chooses the device's I/O mode (iomode.go), binds it, and logs the
// choice, why, and whether the kernel went along with it.
func (h *loopHost) NewLoop(backing *os.File, readOnly bool) (model.Device, error) {
	info, err := loop.InspectBacking(backing)
	if err != nil {
		return nil, err
	}
	disk, err := readDiskIO(backing)
	if err != nil {
		return nil, err
	}
	c := chooseIO(h.io, disk, info)
	dev, err := loop.Attach(backing, loop.Options{ReadOnly: readOnly, Tag: h.tag, DirectIO: c.DirectIO, BlockSize: c.BlockSize})
	if err != nil {
		return nil, err
	}
	io := "buffered"
	if dev.DirectIO() {
		io = "direct"
	}
	if c.DirectIO && !dev.DirectIO() {
		h.log.Warn("loop I/O mode: the kernel refused direct I/O, the device is buffered",
			"dev", dev.Path(), "file", backing.Name(), "block_size", dev.BlockSize(), "reason", c.Reason)
	} else {
		h.log.Info("loop I/O mode", "dev", dev.Path(), "file", backing.Name(), "io", io,
			"block_size", dev.BlockSize(), "reason", c.Reason)
	}
	// The index trusts its uevents once it has seen the one of a bind of ours.
	if h.index != nil && !h.indexed.Load() && h.index.SawAttach(dev) && !h.indexed.Swap(true) {
		h.log.Info("sharing check: loop devices indexed by backing file from the kernel's uevents", "dev", dev.Path(), "diskseq", dev.DiskSeq())
	}
	stored, err := storeLoop(dev) // before physical-device is written (recovery.go)
	if err != nil {
		dev.Close()
		return nil, err
	}
	return stored, nil
}

func (h *loopHost) LoopsOf(file model.FileID, held func(path string) bool) ([]model.Binding, error) {
	id := loop.FileID{Dev: file.Dev, Ino: file.Ino}
	var bs []loop.Binding
	var err error
	if h.index != nil {
		bs, err = h.index.FindByBacking(id, held)
	} else {
		bs, err = loop.FindByBacking(id, held)
	}
	if err != nil {
		return nil, fmt.Errorf("list loop devices: %w", err)
	}
	out := make([]model.Binding, len(bs))
	for i, b := range bs {
		ours := h.tag != "" && strings.HasPrefix(b.Tag, h.tag) // as Recover tells its stored devices
		out[i] = model.Binding{Path: b.Path, Rdev: b.Rdev, DiskSeq: b.DiskSeq, Tag: b.Tag, Ours: ours}
	}
	return out, nil
}

func (h *loopHost) Mounts(devs []uint64) ([]model.Mount, error) { return mounts(h.mountinfo, devs) }

// HeldLoop is a loop device recovery or adoption took over: a model.Device,
// with what their checks ask of it.
type HeldLoop interface {
	model.Device
	Backing() model.FileID // the bound file's st_dev and st_ino
	ReadOnly() bool
}

// Loops reaches the loop devices the model did not make: recovery re-opens
// ours by number and diskseq, adoption claims the stock script's. The real
// machine's host (NewHost) is one; so is the tests' fake (model/modeltest).
type Loops interface {
	// Reopen opens device number if it still has diskseq, and keeps it
	// across a crash (the fd store).
	Reopen(number int, diskseq uint64) (HeldLoop, error)
	// Claim takes over device number, bound to file by someone else (the
	// stock script): AUTOCLEAR, our tag, and kept across a crash.
	Claim(number int, file model.FileID) (HeldLoop, error)
}

func (h *loopHost) Reopen(number int, diskseq uint64) (HeldLoop, error) {
	opened, err := loop.Open(number, diskseq)
	if err != nil {
		return nil, err
	}
	dev, err := storeLoop(opened)
	if err != nil {
		opened.Close()
		return nil, err
	}
	return dev, nil
}

func (h *loopHost) Claim(number int, file model.FileID) (HeldLoop, error) {
	dev, err := loop.Claim(number, loop.FileID{Dev: file.Dev, Ino: file.Ino}, h.tag)
	if err != nil {
		return nil, err
	}
	stored, err := storeLoop(dev)
	if err != nil {
		// AUTOCLEAR is on now: closing our fd could free a device a VM uses.
		// Hold it without the store's copy (a crash of the daemon then frees it
		// once blkback lets go, as any AUTOCLEAR device).
		h.log.Warn("adopt: could not push the device to the fd store; holding it anyway", "dev", dev.Path(), "err", err)
		return &storedDevice{Device: dev}, nil
	}
	return stored, nil
}
