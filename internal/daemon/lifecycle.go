package daemon

// The lifecycle of one backend (docs/architecture.md, "Lifecycle"). Whatever
// happens to a backend is one step, under the backend's lock:
//
//	snapshot  the nodes the decision needs, read in one batch (nodesFor)
//	decide    a pure function of the snapshot, what the daemon holds for the
//	          backend and who asks (the origin): an action
//	act       one function that carries the action out (act.go)
//
// The exec'd add and remove (the API), pre-setup's watch and recovery (at
// start and on `xenblkd takeover`) differ only in the origin they pass.

import (
	"xenblkd/internal/hotplug"
	"xenblkd/internal/model"
)

// origin is who asks for a lifecycle step.
type origin int

const (
	fromAdd      origin = iota // the hotplug entry libxl exec'd for add
	fromRemove                 // the hotplug entry libxl exec'd for remove
	fromPresetup               // pre-setup: a watch event on the backend
	fromRecovery               // Recover at start, AdoptStock on takeover
)

func (o origin) String() string {
	return [...]string{"add", "remove", "presetup", "recovery"}[o]
}

// holding is what the daemon holds for one backend.
type holding struct {
	attached   bool             // the model has an attachment for it
	attachment model.Attachment // that attachment, if attached
	state      backendState     // pre-setup's memory of it (presetup.go)
}

// known reports whether there is anything to drop once the backend is gone.
func (h holding) known() bool { return h.attached || h.state != (backendState{}) }

// facts are what a decision is made from.
type facts struct {
	snap hotplug.Snapshot
	hold holding
	ours bool // the snapshot's script is ours (Scripts.Ours: it stats files, so it is asked before deciding)
}

// action is what a lifecycle step does.
type action int

const (
	doNothing      action = iota
	doAttach              // open params, attach it, write physical-device (Connect)
	doConfirm             // answer from the model: attached already
	doRefuse              // answer with decision.err (an unusable request, XenStore trouble)
	doDetach              // remove physical-device and diskseq, release our attachment
	doReleaseStock        // free the stock script's loop device (not adopted yet), then detach
	doRelease             // the backend is gone: drop what we hold for it
	doRestore             // rebuild the attachment physical-device names (recovery)
	doAdoptStock          // take over the stock script's loop device, then restore
)

var actionNames = [...]string{"nothing", "attach", "confirm", "refuse", "detach",
	"release-stock", "release", "restore", "adopt-stock"}

func (a action) String() string { return actionNames[a] }

// decision is decide's answer.
type decision struct {
	do  action
	why string // for the debug log and tests
	err error  // doRefuse
}

// The nodes each origin's decision may need.
const (
	addNodes      = hotplug.Params | hotplug.Mode | hotplug.PhysicalDevice | hotplug.HotplugError | hotplug.Names // Names: the log line's, in the same round trip
	removeNodes   = hotplug.PhysicalDevice | hotplug.StockNode | hotplug.Params | hotplug.DiskSeq
	presetupNodes = hotplug.Script | hotplug.State | hotplug.PhysicalDevice | hotplug.Params | hotplug.Mode | hotplug.HotplugError
	recoveryNodes = hotplug.Script | hotplug.PhysicalDevice | hotplug.Params | hotplug.Mode | hotplug.DiskSeq | hotplug.StockNode
)

// nodesFor says which nodes to read for a step of origin o, given what the
// daemon holds: none at all when the answer is known already.
func nodesFor(o origin, h holding) hotplug.Node {
	switch o {
	case fromAdd:
		if h.state.presetup && h.attached {
			return 0
		}
		return addNodes
	case fromRemove:
		if h.attached {
			return 0
		}
		return removeNodes
	case fromPresetup:
		switch {
		case h.state.scriptRan || h.state.presetup:
			// Attached by pre-setup, or the script ran: only the backend
			// going away changes anything.
			return hotplug.Dir
		case h.known():
			return presetupNodes | hotplug.Dir
		}
		return presetupNodes
	case fromRecovery:
		if h.attached {
			return 0
		}
		return recoveryNodes
	}
	return 0
}

// decide is the one place that says what happens to a backend.
func decide(o origin, f facts) decision {
	switch o {
	case fromAdd:
		return decideAdd(f)
	case fromRemove:
		return decideRemove(f)
	case fromPresetup:
		return decidePresetup(f)
	case fromRecovery:
		return decideRecovery(f)
	}
	return decision{why: "unknown origin"}
}

func decideAdd(f facts) decision {
	s, st := f.snap, f.hold.state
	if st.presetup && f.hold.attached {
		// Pre-setup wrote this backend's nodes under this same lock, and its
		// watch releases the attachment (and forgets this state) as soon as
		// the directory goes: what it wrote is still there.
		return decision{do: doConfirm, why: "attached by pre-setup"}
	}
	if _, err := s.Request(); err != nil {
		return decision{do: doRefuse, why: "unusable request", err: err}
	}
	if s.Has(hotplug.PhysicalDevice) {
		return decision{do: doConfirm, why: "physical-device already set"}
	}
	// A refusal by pre-setup is decided afresh: what it met (another
	// domain's disk, a missing image) may have changed since, and the stock
	// script too decides when it is exec'd. Refusals are not the fast path.
	return decision{do: doAttach, why: "new backend"}
}

func decideRemove(f facts) decision {
	s := f.snap
	switch {
	case f.hold.attached:
		return decision{do: doDetach, why: "attached here"}
	case s.Err == nil && s.Has(hotplug.PhysicalDevice) && s.Has(hotplug.StockNode) && s.Has(hotplug.Params) && !s.Has(hotplug.DiskSeq):
		// Attached by the stock block script before a takeover and not
		// adopted yet (stock.go): free its device as the stock remove would.
		return decision{do: doReleaseStock, why: "the stock script's device"}
	}
	return decision{do: doDetach, why: "not attached here"}
}

func decidePresetup(f facts) decision {
	s, h := f.snap, f.hold
	switch {
	case h.state.scriptRan || h.state.presetup:
		switch {
		case s.Gone() && h.state.presetup:
			return decision{do: doRelease, why: "gone before its script ran"}
		case s.Gone():
			return decision{do: doRelease, why: "gone after its script ran"}
		}
		return decision{why: "attached, or its script ran: the script decides"}
	case s.Err != nil:
		return decision{why: "XenStore trouble: the exec'd add does the work"}
	case !s.Has(hotplug.Script):
		if s.Gone() && h.known() {
			return decision{do: doRelease, why: "gone before its script ran"}
		}
		return decision{why: "gone, or libxl's nodes not written yet"}
	case !f.ours:
		return decision{why: "another script's backend: never touched"}
	case s.Has(hotplug.PhysicalDevice):
		return decision{why: "physical-device is set (never rewritten)"}
	case s.Has(hotplug.HotplugError):
		// e.g. recovery found the device it named gone: only the exec'd add
		// may try again.
		return decision{why: "an error is recorded"}
	case s.Value(hotplug.State) != "1" && s.Value(hotplug.State) != "2":
		return decision{why: "past InitWait: the script has run, or blkback gave up"}
	}
	if fl := h.state.failure; fl != nil && fl.params == s.Value(hotplug.Params) && fl.mode == s.Value(hotplug.Mode) {
		return decision{why: "tried and refused already"}
	}
	return decision{do: doAttach, why: "new backend of ours"}
}

func decideRecovery(f facts) decision {
	s := f.snap
	switch {
	case f.hold.attached:
		return decision{why: "attached already"}
	case s.Err != nil:
		return decision{do: doRefuse, why: "XenStore trouble", err: s.Err}
	case !f.ours:
		return decision{why: "another script's backend"}
	case !s.Has(hotplug.PhysicalDevice):
		return decision{why: "not attached (an add that never completed, or removed)"}
	case !s.Has(hotplug.DiskSeq) && s.Has(hotplug.StockNode):
		return decision{do: doAdoptStock, why: "the stock script's device"}
	}
	return decision{do: doRestore, why: "attached before the restart"}
}
