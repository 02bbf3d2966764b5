package model

import (
	"xenblkd/internal/text"

	"fmt"
	"strings"
)

// Mode is a backend's access mode, parsed from BE/mode.
type Mode struct {
	Writable bool // a 'w' anywhere, as xen-blkback decides (readonly = !strchr(mode, 'w'))
	Force    bool // a '!': skip the sharing checks, as the stock block script does
}

// ParseMode parses BE/mode. libxl writes "w" or "r"; "!" may be added by hand.
// Anything else is refused rather than guessed at.
func ParseMode(s string) (Mode, error) {
	if s == "" {
		return Mode{}, fmt.Errorf("mode is empty: expected r, w, r! or w!")
	}
	if len(s) > 8 || strings.Trim(s, "rw!") != "" {
		return Mode{}, fmt.Errorf("unknown mode %q: expected r, w, r! or w!", text.Truncate(s, 16))
	}
	m := Mode{Writable: strings.Contains(s, "w"), Force: strings.Contains(s, "!")}
	if !m.Writable && !strings.Contains(s, "r") {
		return Mode{}, fmt.Errorf("unknown mode %q: expected r, w, r! or w!", s)
	}
	return m, nil
}

// String returns the canonical form: "r", "w", "r!" or "w!".
func (m Mode) String() string {
	s := "r"
	if m.Writable {
		s = "w"
	}
	if m.Force {
		s += "!"
	}
	return s
}
