package daemon

import (
	"fmt"
	"os"

	"xenblkd/internal/loop"
	"xenblkd/internal/model"
)

// loopHost is model.Host on the real machine.
type loopHost struct {
	tag       string // lo_file_name of every device we make
	mountinfo string // /proc/self/mountinfo
}

func (h loopHost) NewLoop(backing *os.File, readOnly bool) (model.Device, error) {
	dev, err := loop.Attach(backing, loop.Options{ReadOnly: readOnly, Tag: h.tag})
	if err != nil {
		return nil, err
	}
	stored, err := storeLoop(dev) // before physical-device is written (recovery.go)
	if err != nil {
		dev.Close()
		return nil, err
	}
	return stored, nil
}

func (h loopHost) LoopsOf(file model.FileID, held func(path string) bool) ([]model.Binding, error) {
	bs, err := loop.FindByBackingSkipping(loop.FileID{Dev: file.Dev, Ino: file.Ino}, held)
	if err != nil {
		return nil, fmt.Errorf("list loop devices: %w", err)
	}
	out := make([]model.Binding, len(bs))
	for i, b := range bs {
		out[i] = model.Binding{Path: b.Path, Rdev: b.Rdev, DiskSeq: b.DiskSeq, Tag: b.Tag}
	}
	return out, nil
}

func (h loopHost) Mounts(devs []uint64) ([]model.Mount, error) { return mounts(h.mountinfo, devs) }
