// Package lifecycle is the life of one vbd backend, as the daemon sees it, in
// one place (docs/architecture.md, "Lifecycle"). Whatever happens to a
// backend is one step, under its lock (Table.Lock):
//
//	snapshot  the nodes NodesFor names, read in one batch (none when the
//	          record answers: the remove of a disk attached here)
//	decide    Decide: a pure function of who asks (the Origin), the snapshot
//	          and the backend's Record: an Action, and the next Record
//	act       the daemon carries the action out (internal/daemon, act.go);
//	          for an attach or a restore, whose result only it knows,
//	          Settle makes the next Record from that result
//
// The exec'd add and remove (the API), pre-setup's watch, and recovery (at
// start, and adoption of the stock script's devices on `xenblkd takeover`)
// differ only in the Origin they pass.
//
// A backend's phases, and what moves it from one to the next:
//
//	None ──pre-setup attached──▶ PresetUp ──exec'd add──▶ ScriptRan
//	  │ ──pre-setup refused───▶ Refused  ──exec'd add (decides again)──▶ ScriptRan
//	  │ ──exec'd add/remove───▶ ScriptRan
//	  │ ──recovery restored───▶ Adopted  ──exec'd add/remove──▶ ScriptRan
//	any ──directory gone (pre-setup's watch)──▶ None, released
package lifecycle

import (
	"xenblkd/internal/hotplug"
	"xenblkd/internal/model"
)

// Origin is who asks for a step.
type Origin int

const (
	FromAdd      Origin = iota // the hotplug entry libxl exec'd for add
	FromRemove                 // the hotplug entry libxl exec'd for remove
	FromPresetup               // pre-setup: a watch event on the backend
	FromRecovery               // Recover at start, AdoptStock on takeover
)

func (o Origin) String() string {
	return [...]string{"add", "remove", "presetup", "recovery"}[o]
}

// Phase is where a backend is in its life.
type Phase int

const (
	None      Phase = iota // nothing known of it: never seen, or forgotten
	PresetUp               // attached by pre-setup; the exec'd add has not confirmed it yet
	Refused                // pre-setup refused it (Record.Refusal); the exec'd add decides again
	ScriptRan              // the exec'd add or remove ran: the script decides from now on
	Adopted                // restored at start, or the stock script's device adopted; no script ran since
)

func (p Phase) String() string {
	return [...]string{"none", "presetup", "refused", "script-ran", "adopted"}[p]
}

// Record is all the daemon knows of one backend beyond XenStore. The zero
// Record is a backend it knows nothing of.
type Record struct {
	Phase Phase
	// Attached says the model holds Attachment for the backend.
	Attached   bool
	Attachment model.Attachment
	// Refusal is the request pre-setup refused (phase Refused): a backend
	// re-created with other params or mode is not the one that was refused.
	Refusal hotplug.Request
}

// Known reports whether there is anything to drop once the backend is gone.
func (r Record) Known() bool { return r.Phase != None || r.Attached }

// Facts are what a decision is made from besides the record.
type Facts struct {
	Snap hotplug.Snapshot
	Ours bool // the snapshot's script is ours (Scripts.Ours stats files, so it is asked before deciding)
}

// Action is what a step does.
type Action int

const (
	Nothing      Action = iota
	Attach              // open params, attach it, write physical-device (Connect); a held attachment (of a re-created directory) is released first
	Confirm             // answer from the record: attached here already
	Refuse              // answer with Decision.Err (an unusable request, XenStore trouble)
	Detach              // remove physical-device and diskseq, release our attachment
	ReleaseStock        // free the stock script's loop device (not adopted yet), then detach
	Release             // the backend is gone: drop what we hold for it
	Restore             // rebuild the attachment physical-device names (recovery)
	AdoptStock          // take over the stock script's loop device, then restore
)

var actionNames = [...]string{"nothing", "attach", "confirm", "refuse", "detach",
	"release-stock", "release", "restore", "adopt-stock"}

func (a Action) String() string { return actionNames[a] }

// Decision is Decide's answer.
type Decision struct {
	Do   Action
	Why  string // for the debug log and tests
	Err  error  // Refuse
	Next Record // the record once the action is done (for Attach, Restore and AdoptStock: if it attached; see Settle)
	// Request is what pre-setup's Attach is for: remembered if it is refused.
	Request hotplug.Request
}

// Writes reports whether the step may write the backend's nodes while it
// acts (so pre-setup's watch need not check the events of its own writes).
func (d Decision) Writes(o Origin) bool { return o == FromAdd || d.Do == Attach }

// The nodes each origin's decision may need.
const (
	AddNodes      = hotplug.Params | hotplug.Mode | hotplug.PhysicalDevice | hotplug.HotplugError
	RemoveNodes   = hotplug.PhysicalDevice | hotplug.StockNode | hotplug.Params | hotplug.DiskSeq
	PresetupNodes = hotplug.Script | hotplug.State | hotplug.PhysicalDevice | hotplug.Params | hotplug.Mode | hotplug.HotplugError
	RecoveryNodes = hotplug.Script | hotplug.PhysicalDevice | hotplug.Params | hotplug.Mode | hotplug.DiskSeq | hotplug.StockNode
)

// NodesFor says which nodes to read for a step of origin o, given the
// backend's record: none at all when the record answers.
func NodesFor(o Origin, r Record) hotplug.Node {
	switch o {
	case FromAdd:
		// Even a backend pre-setup attached: its directory may have been
		// removed and written again since, before pre-setup's watch got to
		// the removal (its queue can be behind, and libxl's add does not
		// wait for it).
		return AddNodes
	case FromRemove:
		if r.Attached {
			return 0
		}
		return RemoveNodes
	case FromPresetup:
		switch {
		case r.Phase == ScriptRan || r.Phase == PresetUp:
			// Attached by pre-setup, or the script ran: only the backend
			// going away changes anything.
			return hotplug.Dir
		case r.Known():
			return PresetupNodes | hotplug.Dir
		}
		return PresetupNodes
	case FromRecovery:
		if r.Attached {
			return 0
		}
		return RecoveryNodes
	}
	return 0
}

// Decide is the one place that says what happens to a backend.
func Decide(o Origin, f Facts, r Record) Decision {
	switch o {
	case FromAdd:
		return decideAdd(f, r)
	case FromRemove:
		return decideRemove(f, r)
	case FromPresetup:
		return decidePresetup(f, r)
	case FromRecovery:
		return decideRecovery(f, r)
	}
	return Decision{Why: "unknown origin", Next: r}
}

func decideAdd(f Facts, r Record) Decision {
	s := f.Snap
	ran := Record{Phase: ScriptRan, Attached: r.Attached, Attachment: r.Attachment}
	if _, err := s.Request(); err != nil {
		return Decision{Do: Refuse, Why: "unusable request", Err: err, Next: ran}
	}
	switch {
	case s.Has(hotplug.PhysicalDevice) && r.Attached && r.Phase == PresetUp:
		return Decision{Do: Confirm, Why: "attached by pre-setup", Next: ran}
	case s.Has(hotplug.PhysicalDevice) && r.Attached:
		return Decision{Do: Confirm, Why: "physical-device already set", Next: ran}
	case s.Has(hotplug.PhysicalDevice):
		// Written by someone else (another daemon, by hand): nothing of
		// ours to confirm, and never rewritten.
		return Decision{Why: "physical-device set by someone else", Next: ran}
	case r.Attached:
		// What we hold was written to a directory that is gone: this one
		// was written again since (pre-setup's watch has not handled the
		// removal yet). Confirming it would answer success with no
		// physical-device for blkback. The act releases it first.
		return Decision{Do: Attach, Why: "re-created since attached", Next: Record{Phase: ScriptRan}}
	}
	// A refusal by pre-setup is decided afresh: what it met (another
	// domain's disk, a missing image) may have changed since, and the stock
	// script too decides when it is exec'd. Refusals are not the fast path.
	return Decision{Do: Attach, Why: "new backend", Next: Record{Phase: ScriptRan}}
}

func decideRemove(f Facts, r Record) Decision {
	s := f.Snap
	// Whatever it finds, the script ran: pre-setup must not attach the
	// backend again while its directory lingers without physical-device.
	next := Record{Phase: ScriptRan}
	switch {
	case r.Attached:
		return Decision{Do: Detach, Why: "attached here", Next: next}
	case s.Err == nil && s.Has(hotplug.PhysicalDevice) && s.Has(hotplug.StockNode) && s.Has(hotplug.Params) && !s.Has(hotplug.DiskSeq):
		// Attached by the stock block script before a takeover and not
		// adopted yet (internal/daemon, stock.go): free its device as the
		// stock remove would.
		return Decision{Do: ReleaseStock, Why: "the stock script's device", Next: next}
	}
	return Decision{Do: Detach, Why: "not attached here", Next: next}
}

func decidePresetup(f Facts, r Record) Decision {
	s := f.Snap
	nothing := func(why string) Decision { return Decision{Why: why, Next: r} }
	switch {
	case r.Phase == ScriptRan || r.Phase == PresetUp:
		switch {
		case s.Gone() && r.Phase == PresetUp:
			return Decision{Do: Release, Why: "gone before its script ran"}
		case s.Gone():
			return Decision{Do: Release, Why: "gone after its script ran"}
		}
		return nothing("attached, or its script ran: the script decides")
	case s.Err != nil:
		return nothing("XenStore trouble: the exec'd add does the work")
	case !s.Has(hotplug.Script):
		if s.Gone() && r.Known() {
			return Decision{Do: Release, Why: "gone before its script ran"}
		}
		return nothing("gone, or libxl's nodes not written yet")
	case !f.Ours:
		return nothing("another script's backend: never touched")
	case s.Has(hotplug.PhysicalDevice):
		return nothing("physical-device is set (never rewritten)")
	case s.Has(hotplug.HotplugError):
		// e.g. recovery found the device it named gone: only the exec'd add
		// may try again.
		return nothing("an error is recorded")
	case s.Value(hotplug.State) != "1" && s.Value(hotplug.State) != "2":
		return nothing("past InitWait: the script has run, or blkback gave up")
	}
	req := hotplug.Request{Params: s.Value(hotplug.Params), Mode: s.Value(hotplug.Mode)}
	if r.Phase == Refused && r.Refusal == req {
		return nothing("tried and refused already")
	}
	return Decision{Do: Attach, Why: "new backend of ours", Next: Record{Phase: PresetUp}, Request: req}
}

func decideRecovery(f Facts, r Record) Decision {
	s := f.Snap
	switch {
	case r.Attached:
		return Decision{Why: "attached already", Next: r}
	case s.Err != nil:
		return Decision{Do: Refuse, Why: "XenStore trouble", Err: s.Err, Next: r}
	case !f.Ours:
		return Decision{Why: "another script's backend", Next: r}
	case !s.Has(hotplug.PhysicalDevice):
		return Decision{Why: "not attached (an add that never completed, or removed)", Next: r}
	case !s.Has(hotplug.DiskSeq) && s.Has(hotplug.StockNode):
		return Decision{Do: AdoptStock, Why: "the stock script's device", Next: Record{Phase: Adopted}}
	}
	return Decision{Do: Restore, Why: "attached before the restart", Next: Record{Phase: Adopted}}
}

// Outcome is what act reports of an attach or a restore.
type Outcome struct {
	// Attachment is what the model now holds for the backend; nil: nothing
	// was attached (an error, or a device that did not check out).
	Attachment *model.Attachment
	Err        error
	// Transient says Err is worth a retry by the exec'd add rather than
	// remembering (XenStore unreachable, the daemon stopping, the backend
	// vanishing under the write).
	Transient bool
}

// Settle is the record after act carried d out with outcome out (for an
// origin-o step): d.Next, unless what an attach or restore made differs.
func Settle(o Origin, r Record, d Decision, out Outcome) Record {
	switch d.Do {
	case Attach, Restore, AdoptStock:
	default:
		return d.Next
	}
	if out.Attachment != nil {
		next := d.Next
		next.Attached, next.Attachment = true, *out.Attachment
		return next
	}
	switch {
	case d.Do != Attach:
		return r // nothing restored: as before
	case o != FromPresetup:
		return Record{Phase: ScriptRan}
	case out.Err == nil, out.Transient:
		return Record{} // physical-device appeared meanwhile, or the exec'd add will retry
	}
	// Remembered so that pre-setup does not try again on every event; the
	// exec'd add decides afresh.
	return Record{Phase: Refused, Refusal: d.Request}
}
