package daemon

import (
	"path"
	"strings"
	"xenblkd/internal/api"

	"golang.org/x/sys/unix"
)

// Scripts decides which backends are ours, from their script node (the
// absolute path libxl writes to BE/script and execs). It is the one answer
// pre-setup, recovery and adoption all use. The zero value knows only the
// base name xenblkd and api.DefaultEntry.
type Scripts struct {
	// Extra are more scripts that name xenblkd (--scripts): an entry with a
	// "/" is compared with the whole path, one without with its base name.
	Extra []string
	// Entry is the hotplug entry (api.DefaultEntry if empty). A script that
	// resolves to the same file, by device and inode, is ours: so
	// /etc/xen/scripts/block is recognised once `xenblkd takeover` made it a
	// link to the entry, and no longer after `xenblkd takeover --undo`.
	Entry string
}

// Ours reports whether a backend whose script node is script is ours.
func (s Scripts) Ours(script string) bool {
	if script == "" {
		return false
	}
	base := path.Base(script)
	if base == "xenblkd" {
		return true
	}
	for _, e := range s.Extra {
		if e == "" {
			continue
		}
		if strings.Contains(e, "/") {
			if script == e {
				return true
			}
		} else if base == e {
			return true
		}
	}
	if !path.IsAbs(script) {
		return false
	}
	entry := s.Entry
	if entry == "" {
		entry = api.DefaultEntry
	}
	// Two stats per decision (a few µs): cached identities would go stale
	// when a package upgrade replaces the binary or takeover is undone.
	var a, b unix.Stat_t
	if unix.Stat(entry, &a) != nil || unix.Stat(script, &b) != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

func (s Scripts) String() string {
	entry := s.Entry
	if entry == "" {
		entry = api.DefaultEntry
	}
	return strings.Join(append([]string{"xenblkd", "same file as " + entry}, s.Extra...), ",")
}
