package model

import "sort"

// HeldDevice is a loop device the model holds the fd of.
type HeldDevice struct {
	Path    string
	Rdev    uint64
	DiskSeq uint64
	IO      IOMode
	Users   int // backends using it; 0 means held for no one (a leak, or adopted without a backend)
}

// Held lists every loop device the model holds, ordered by path.
func (m *Model) Held() []HeldDevice {
	m.mu.Lock()
	out := make([]HeldDevice, 0, len(m.devices))
	for _, ld := range m.devices {
		out = append(out, HeldDevice{Path: ld.dev.Path(), Rdev: ld.dev.Rdev(), DiskSeq: ld.dev.DiskSeq(), IO: ioModeOf(ld.dev), Users: len(ld.users)})
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out
}
