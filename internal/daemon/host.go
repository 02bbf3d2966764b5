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
