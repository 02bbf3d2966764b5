package hotplug

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"xenblkd/internal/xenstore"
)

// Tree is where the vbd backends live, relative to the backend domain (dom0
// or a driver domain): Tree/<domid>/<devid>.
const Tree = "backend/vbd"

// ListBackends lists the backends under Tree, ordered by domain and device:
// one listing of the domains, then one batch listing each domain's devices.
func ListBackends(ctx context.Context, s Store) ([]Backend, error) {
	domains, err := s.Directory(ctx, Tree)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", Tree, err)
	}
	ops := make([]xenstore.Op, len(domains))
	for i, dom := range domains {
		ops[i] = xenstore.Directory(Tree + "/" + dom)
	}
	var out []Backend
	for i, r := range s.Batch(ctx, ops) {
		if errors.Is(r.Err, unix.ENOENT) {
			continue // domain destroyed meanwhile
		}
		if r.Err != nil {
			return nil, fmt.Errorf("list %s/%s: %w", Tree, domains[i], r.Err)
		}
		for _, dev := range r.Names {
			if b, err := ParseBackendPath(Tree + "/" + domains[i] + "/" + dev); err == nil {
				out = append(out, b) // else not libxl's
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Domid != out[j].Domid {
			return out[i].Domid < out[j].Domid
		}
		return out[i].Devid < out[j].Devid
	})
	return out, nil
}

// Level is what a watch event on Tree is about.
type Level int

const (
	LevelNone    Level = iota // not a vbd backend path
	LevelTree                 // Tree itself
	LevelDomain               // Tree/<domid>
	LevelBackend              // Tree/<domid>/<devid>[/...]
)

// Event is a watch event's path, classified.
type Event struct {
	Level   Level
	Domid   uint32  // LevelDomain and LevelBackend
	Backend Backend // LevelBackend
	Node    string  // LevelBackend: the first name below the backend directory, "" for the directory itself
}

// ParseEvent classifies a watch event's path (relative, as registered; an
// absolute /local/domain/<id>/backend/vbd/... is accepted too).
func ParseEvent(p string) Event {
	if strings.HasPrefix(p, "/") {
		i := strings.Index(p, "/"+Tree)
		if i < 0 {
			return Event{}
		}
		p = p[i+1:]
	}
	rest, ok := strings.CutPrefix(p, Tree)
	if !ok || (rest != "" && rest[0] != '/') {
		return Event{}
	}
	parts := strings.SplitN(strings.TrimPrefix(rest, "/"), "/", 4) // domid, devid, node, below
	switch {
	case rest == "":
		return Event{Level: LevelTree}
	case len(parts) == 1:
		n, err := strconv.ParseUint(parts[0], 10, 32)
		if err != nil {
			return Event{}
		}
		return Event{Level: LevelDomain, Domid: uint32(n)}
	}
	b, err := ParseBackendPath(Tree + "/" + parts[0] + "/" + parts[1])
	if err != nil {
		return Event{}
	}
	ev := Event{Level: LevelBackend, Domid: b.Domid, Backend: b}
	if len(parts) >= 3 {
		ev.Node = parts[2]
	}
	return ev
}

// Creates reports whether node (an Event's Node) is one libxl writes to
// create or re-create a backend: the directory itself, script, params, mode,
// state. A change to any other node cannot make a backend new.
func Creates(node string) bool {
	switch node {
	case "", nameScript, nameParams, nameMode, nameState:
		return true
	}
	return false
}

// WrittenByConnect reports whether Connect writes node.
func WrittenByConnect(node string) bool {
	switch node {
	case namePhysicalDevice, namePhysicalDevicePath, nameDiskSeq, nameHotplugStatus:
		return true
	}
	return false
}
