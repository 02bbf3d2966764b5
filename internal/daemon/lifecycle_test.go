package daemon

import (
	"errors"
	"testing"

	"xenblkd/internal/hotplug"
)

// TestDecide is the lifecycle's table: for every origin, what the daemon
// does given the backend's snapshot and what it holds (no I/O).
func TestDecide(t *testing.T) {
	type nodes = map[hotplug.Node]string
	b := hotplug.Backend{Domid: 3, Devid: 51712}
	req := nodes{hotplug.Params: "/srv/a.img", hotplug.Mode: "w"}
	with := func(base nodes, kv ...any) nodes {
		out := nodes{}
		for k, v := range base {
			out[k] = v
		}
		for i := 0; i+1 < len(kv); i += 2 {
			out[kv[i].(hotplug.Node)] = kv[i+1].(string)
		}
		return out
	}
	fresh := with(req, hotplug.Script, "/etc/xen/scripts/xenblkd", hotplug.State, "2", hotplug.Dir, "")
	failed := backendState{failure: &presetupFailure{params: "/srv/a.img", mode: "w"}}
	trouble := errors.New("xenstore: connection lost")
	attached := holding{attached: true}
	tests := []struct {
		name     string
		o        origin
		hold     holding
		present  nodes
		err      error // of the snapshot's reads
		notOurs  bool
		want     action
		wantRead hotplug.Node // nodesFor
	}{
		// The exec'd add.
		{"add: new", fromAdd, holding{}, req, nil, false, doAttach, addNodes},
		{"add: confirm pre-setup from memory", fromAdd, holding{attached: true, state: backendState{presetup: true}}, nil, nil, false, doConfirm, 0},
		{"add: physical-device set", fromAdd, attached, with(req, hotplug.PhysicalDevice, "7:0"), nil, false, doConfirm, addNodes},
		{"add: params missing", fromAdd, holding{}, nodes{hotplug.Mode: "w"}, nil, false, doRefuse, addNodes},
		{"add: XenStore trouble", fromAdd, holding{}, req, trouble, false, doRefuse, addNodes},
		{"add: pre-setup's refusal, decided again", fromAdd, holding{state: failed}, req, nil, false, doAttach, addNodes},
		{"add: failure for another params", fromAdd, holding{state: failed}, with(req, hotplug.Params, "/srv/b.img"), nil, false, doAttach, addNodes},
		{"add: failure, then attached by someone", fromAdd, holding{state: failed}, with(req, hotplug.PhysicalDevice, "7:0"), nil, false, doConfirm, addNodes},
		{"add: after a remove, again", fromAdd, holding{state: backendState{scriptRan: true}}, req, nil, false, doAttach, addNodes},
		// The exec'd remove.
		{"remove: attached", fromRemove, attached, nil, nil, false, doDetach, 0},
		{"remove: not attached", fromRemove, holding{}, req, nil, false, doDetach, removeNodes},
		{"remove: the stock script's device", fromRemove, holding{}, with(req, hotplug.PhysicalDevice, "7:4", hotplug.StockNode, "/dev/loop4"), nil, false, doReleaseStock, removeNodes},
		{"remove: ours, not held", fromRemove, holding{}, with(req, hotplug.PhysicalDevice, "7:4", hotplug.StockNode, "/dev/loop4", hotplug.DiskSeq, "2a"), nil, false, doDetach, removeNodes},
		// Pre-setup.
		{"presetup: new backend of ours", fromPresetup, holding{}, fresh, nil, false, doAttach, presetupNodes},
		{"presetup: another script's", fromPresetup, holding{}, fresh, nil, true, doNothing, presetupNodes},
		{"presetup: nodes not written yet", fromPresetup, holding{}, nil, nil, false, doNothing, presetupNodes},
		{"presetup: gone before the script ran", fromPresetup, holding{attached: true, state: backendState{presetup: true}}, nil, nil, false, doRelease, hotplug.Dir},
		{"presetup: gone, remembered a failure", fromPresetup, holding{state: failed}, nil, nil, false, doRelease, presetupNodes | hotplug.Dir},
		{"presetup: script gone, directory still there", fromPresetup, attached, nodes{hotplug.Dir: ""}, nil, false, doNothing, presetupNodes | hotplug.Dir},
		{"presetup: attached by us already", fromPresetup, holding{attached: true, state: backendState{presetup: true}}, nodes{hotplug.Dir: ""}, nil, false, doNothing, hotplug.Dir},
		{"presetup: physical-device set", fromPresetup, holding{}, with(fresh, hotplug.PhysicalDevice, "7:0"), nil, false, doNothing, presetupNodes},
		{"presetup: an error recorded", fromPresetup, holding{}, with(fresh, hotplug.HotplugError, "gone"), nil, false, doNothing, presetupNodes},
		{"presetup: past InitWait", fromPresetup, holding{}, with(fresh, hotplug.State, "4"), nil, false, doNothing, presetupNodes},
		{"presetup: refused already", fromPresetup, holding{state: failed}, fresh, nil, false, doNothing, presetupNodes | hotplug.Dir},
		{"presetup: re-created with other params", fromPresetup, holding{state: failed}, with(fresh, hotplug.Params, "/srv/b.img"), nil, false, doAttach, presetupNodes | hotplug.Dir},
		{"presetup: XenStore trouble", fromPresetup, holding{}, fresh, trouble, false, doNothing, presetupNodes},
		{"presetup: script ran, still there", fromPresetup, holding{state: backendState{scriptRan: true}}, nodes{hotplug.Dir: ""}, nil, false, doNothing, hotplug.Dir},
		{"presetup: script ran, gone", fromPresetup, holding{attached: true, state: backendState{scriptRan: true}}, nil, nil, false, doRelease, hotplug.Dir},
		// Recovery and adoption.
		{"recovery: attached before the restart", fromRecovery, holding{}, with(fresh, hotplug.PhysicalDevice, "7:0", hotplug.DiskSeq, "2a"), nil, false, doRestore, recoveryNodes},
		{"recovery: the stock script's device", fromRecovery, holding{}, with(fresh, hotplug.PhysicalDevice, "7:4", hotplug.StockNode, "/dev/loop4"), nil, false, doAdoptStock, recoveryNodes},
		{"recovery: no physical-device", fromRecovery, holding{}, fresh, nil, false, doNothing, recoveryNodes},
		{"recovery: another script's", fromRecovery, holding{}, with(fresh, hotplug.PhysicalDevice, "7:0"), nil, true, doNothing, recoveryNodes},
		{"recovery: attached already (adoption)", fromRecovery, attached, nil, nil, false, doNothing, 0},
		{"recovery: XenStore trouble", fromRecovery, holding{}, fresh, trouble, false, doRefuse, recoveryNodes},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			read := nodesFor(tt.o, tt.hold)
			if read != tt.wantRead {
				t.Errorf("nodesFor = %b, want %b", read, tt.wantRead)
			}
			f := facts{snap: hotplug.SnapshotOf(b, read, tt.present, tt.err), hold: tt.hold}
			f.ours = f.snap.Has(hotplug.Script) && !tt.notOurs
			got := decide(tt.o, f)
			if got.do != tt.want {
				t.Errorf("decide = %v (%s), want %v", got.do, got.why, tt.want)
			}
			if (got.do == doRefuse) != (got.err != nil) {
				t.Errorf("decide = %v with err %v: a refusal, and only a refusal, carries the error", got.do, got.err)
			}
		})
	}
}
