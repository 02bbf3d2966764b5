package lifecycle

import (
	"errors"
	"testing"

	"xenblkd/internal/hotplug"
	"xenblkd/internal/model"
)

// TestDecide is the lifecycle's table: for every origin, what a step does
// given the backend's snapshot and record, and the record it leaves (no I/O).
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
	att := model.Attachment{Key: model.Key{Domid: 3, Devid: 51712}, DevPath: "/dev/loop0"}
	refused := Record{Phase: Refused, Refusal: hotplug.Request{Params: "/srv/a.img", Mode: "w"}}
	presetUp := Record{Phase: PresetUp, Attached: true, Attachment: att}
	adopted := Record{Phase: Adopted, Attached: true, Attachment: att}
	ran := Record{Phase: ScriptRan}
	ranAttached := Record{Phase: ScriptRan, Attached: true, Attachment: att}
	trouble := errors.New("xenstore: connection lost")
	tests := []struct {
		name     string
		o        Origin
		rec      Record
		present  nodes
		err      error // of the snapshot's reads
		notOurs  bool
		want     Action
		wantRead hotplug.Node // NodesFor
		wantNext Record       // Decision.Next
	}{
		// The exec'd add.
		{"add: new", FromAdd, Record{}, req, nil, false, Attach, AddNodes, ran},
		{"add: confirm pre-setup", FromAdd, presetUp, with(req, hotplug.PhysicalDevice, "7:0"), nil, false, Confirm, AddNodes, ranAttached},
		{"add: pre-set-up directory re-created", FromAdd, presetUp, req, nil, false, Attach, AddNodes, ran},
		{"add: attached directory re-created", FromAdd, ranAttached, req, nil, false, Attach, AddNodes, ran},
		{"add: adopted, physical-device set", FromAdd, adopted, with(req, hotplug.PhysicalDevice, "7:0"), nil, false, Confirm, AddNodes, ranAttached},
		{"add: physical-device set by someone else", FromAdd, Record{}, with(req, hotplug.PhysicalDevice, "7:0"), nil, false, Nothing, AddNodes, ran},
		{"add: params missing", FromAdd, Record{}, nodes{hotplug.Mode: "w"}, nil, false, Refuse, AddNodes, ran},
		{"add: XenStore trouble", FromAdd, Record{}, req, trouble, false, Refuse, AddNodes, ran},
		{"add: pre-setup's refusal, decided again", FromAdd, refused, req, nil, false, Attach, AddNodes, ran},
		{"add: refusal, then attached by someone else", FromAdd, refused, with(req, hotplug.PhysicalDevice, "7:0"), nil, false, Nothing, AddNodes, ran},
		{"add: after a remove, again", FromAdd, ran, req, nil, false, Attach, AddNodes, ran},
		// The exec'd remove.
		{"remove: attached", FromRemove, ranAttached, nil, nil, false, Detach, 0, ran},
		{"remove: pre-set-up, script never added", FromRemove, presetUp, nil, nil, false, Detach, 0, ran},
		{"remove: not attached", FromRemove, Record{}, req, nil, false, Detach, RemoveNodes, ran},
		{"remove: the stock script's device", FromRemove, Record{}, with(req, hotplug.PhysicalDevice, "7:4", hotplug.StockNode, "/dev/loop4"), nil, false, ReleaseStock, RemoveNodes, ran},
		{"remove: ours, not held", FromRemove, Record{}, with(req, hotplug.PhysicalDevice, "7:4", hotplug.StockNode, "/dev/loop4", hotplug.DiskSeq, "2a"), nil, false, Detach, RemoveNodes, ran},
		// Pre-setup.
		{"presetup: new backend of ours", FromPresetup, Record{}, fresh, nil, false, Attach, PresetupNodes, Record{Phase: PresetUp}},
		{"presetup: another script's", FromPresetup, Record{}, fresh, nil, true, Nothing, PresetupNodes, Record{}},
		{"presetup: nodes not written yet", FromPresetup, Record{}, nil, nil, false, Nothing, PresetupNodes, Record{}},
		{"presetup: gone before the script ran", FromPresetup, presetUp, nil, nil, false, Release, hotplug.Dir, Record{}},
		{"presetup: gone, remembered a refusal", FromPresetup, refused, nil, nil, false, Release, PresetupNodes | hotplug.Dir, Record{}},
		{"presetup: adopted, gone without our remove", FromPresetup, adopted, nil, nil, false, Release, PresetupNodes | hotplug.Dir, Record{}},
		{"presetup: script gone, directory still there", FromPresetup, adopted, nodes{hotplug.Dir: ""}, nil, false, Nothing, PresetupNodes | hotplug.Dir, adopted},
		{"presetup: attached by us already", FromPresetup, presetUp, nodes{hotplug.Dir: ""}, nil, false, Nothing, hotplug.Dir, presetUp},
		{"presetup: physical-device set", FromPresetup, Record{}, with(fresh, hotplug.PhysicalDevice, "7:0"), nil, false, Nothing, PresetupNodes, Record{}},
		{"presetup: an error recorded", FromPresetup, Record{}, with(fresh, hotplug.HotplugError, "gone"), nil, false, Nothing, PresetupNodes, Record{}},
		{"presetup: past InitWait", FromPresetup, Record{}, with(fresh, hotplug.State, "4"), nil, false, Nothing, PresetupNodes, Record{}},
		{"presetup: refused already", FromPresetup, refused, fresh, nil, false, Nothing, PresetupNodes | hotplug.Dir, refused},
		{"presetup: re-created with other params", FromPresetup, refused, with(fresh, hotplug.Params, "/srv/b.img"), nil, false, Attach, PresetupNodes | hotplug.Dir, Record{Phase: PresetUp}},
		{"presetup: XenStore trouble", FromPresetup, Record{}, fresh, trouble, false, Nothing, PresetupNodes, Record{}},
		{"presetup: script ran, still there", FromPresetup, ran, nodes{hotplug.Dir: ""}, nil, false, Nothing, hotplug.Dir, ran},
		{"presetup: script ran, gone", FromPresetup, ranAttached, nil, nil, false, Release, hotplug.Dir, Record{}},
		// Recovery and adoption.
		{"recovery: attached before the restart", FromRecovery, Record{}, with(fresh, hotplug.PhysicalDevice, "7:0", hotplug.DiskSeq, "2a"), nil, false, Restore, RecoveryNodes, Record{Phase: Adopted}},
		{"recovery: the stock script's device", FromRecovery, Record{}, with(fresh, hotplug.PhysicalDevice, "7:4", hotplug.StockNode, "/dev/loop4"), nil, false, AdoptStock, RecoveryNodes, Record{Phase: Adopted}},
		{"recovery: no physical-device", FromRecovery, Record{}, fresh, nil, false, Nothing, RecoveryNodes, Record{}},
		{"recovery: another script's", FromRecovery, Record{}, with(fresh, hotplug.PhysicalDevice, "7:0"), nil, true, Nothing, RecoveryNodes, Record{}},
		{"recovery: attached already (adoption)", FromRecovery, ranAttached, nil, nil, false, Nothing, 0, ranAttached},
		{"recovery: XenStore trouble", FromRecovery, Record{}, fresh, trouble, false, Refuse, RecoveryNodes, Record{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			read := NodesFor(tt.o, tt.rec)
			if read != tt.wantRead {
				t.Errorf("NodesFor = %b, want %b", read, tt.wantRead)
			}
			f := Facts{Snap: hotplug.SnapshotOf(b, read, tt.present, tt.err)}
			f.Ours = f.Snap.Has(hotplug.Script) && !tt.notOurs
			got := Decide(tt.o, f, tt.rec)
			if got.Do != tt.want {
				t.Errorf("Decide = %v (%s), want %v", got.Do, got.Why, tt.want)
			}
			if (got.Do == Refuse) != (got.Err != nil) {
				t.Errorf("Decide = %v with err %v: a refusal, and only a refusal, carries the error", got.Do, got.Err)
			}
			if !same(got.Next, tt.wantNext) {
				t.Errorf("Decide's next record = %+v, want %+v", got.Next, tt.wantNext)
			}
		})
	}
}

func same(a, b Record) bool {
	return a.Phase == b.Phase && a.Attached == b.Attached && a.Refusal == b.Refusal &&
		a.Attachment.Key == b.Attachment.Key && a.Attachment.DevPath == b.Attachment.DevPath
}

// TestSettle: the record after an attach or a restore, from what it came to.
func TestSettle(t *testing.T) {
	att := model.Attachment{Key: model.Key{Domid: 3, Devid: 51712}, DevPath: "/dev/loop0"}
	req := hotplug.Request{Params: "/srv/a.img", Mode: "w"}
	presetupAttach := Decision{Do: Attach, Next: Record{Phase: PresetUp}, Request: req}
	addAttach := Decision{Do: Attach, Next: Record{Phase: ScriptRan}}
	restore := Decision{Do: Restore, Next: Record{Phase: Adopted}}
	refusal := errors.New("domain 3 uses it read-write")
	tests := []struct {
		name string
		o    Origin
		rec  Record
		d    Decision
		out  Outcome
		want Record
	}{
		{"pre-setup attached", FromPresetup, Record{}, presetupAttach, Outcome{Attachment: &att}, Record{Phase: PresetUp, Attached: true, Attachment: att}},
		{"pre-setup refused", FromPresetup, Record{}, presetupAttach, Outcome{Err: refusal}, Record{Phase: Refused, Refusal: req}},
		{"pre-setup interrupted", FromPresetup, Record{}, presetupAttach, Outcome{Err: refusal, Transient: true}, Record{}},
		{"exec'd add attached", FromAdd, Record{Phase: Refused, Refusal: req}, addAttach, Outcome{Attachment: &att}, Record{Phase: ScriptRan, Attached: true, Attachment: att}},
		{"exec'd add refused", FromAdd, Record{Phase: Refused, Refusal: req}, addAttach, Outcome{Err: refusal}, Record{Phase: ScriptRan}},
		{"restored", FromRecovery, Record{}, restore, Outcome{Attachment: &att}, Record{Phase: Adopted, Attached: true, Attachment: att}},
		{"mismatched: nothing restored", FromRecovery, Record{}, restore, Outcome{}, Record{}},
		{"detach: as decided", FromRemove, Record{Phase: ScriptRan, Attached: true}, Decision{Do: Detach, Next: Record{Phase: ScriptRan}}, Outcome{}, Record{Phase: ScriptRan}},
	}
	for _, tt := range tests {
		if got := Settle(tt.o, tt.rec, tt.d, tt.out); !same(got, tt.want) {
			t.Errorf("%s: Settle = %+v, want %+v", tt.name, got, tt.want)
		}
	}
}

func TestEcho(t *testing.T) {
	var tb Table
	k := model.Key{Domid: 1, Devid: 51712}
	check := func(when string, want map[string]bool) {
		t.Helper()
		for node, w := range want {
			if got := tb.Echo(k, node); got != w {
				t.Errorf("%s: Echo(%q) = %v, want %v", when, node, got, w)
			}
		}
	}
	check("no record", map[string]bool{"": false, "physical-device": false, "sectors": false, "script": false})
	end := tb.StartWriting(k)
	check("our add writing", map[string]bool{"": false, "physical-device": true, "diskseq": true, "hotplug-status": true, "sectors": false, "params": false})
	tb.Put(k, Record{Phase: PresetUp, Attached: true})
	end()
	check("pre-setup attached", map[string]bool{"": false, "physical-device": true, "sectors": true, "script": false, "params": false, "mode": false, "state": false})
	tb.Put(k, Record{Phase: Refused})
	check("pre-setup refused", map[string]bool{"": false, "physical-device": false, "sectors": false})
	tb.Put(k, Record{Phase: ScriptRan})
	check("script ran", map[string]bool{"": false, "physical-device": true, "hotplug-error": true, "script": false})
	tb.Put(k, Record{})
	if keys := tb.Keys(0, true); len(keys) != 0 {
		t.Errorf("a zero record is kept: keys %v", keys)
	}
}

// TestTableBound: records without an attachment are bounded; those with one are not.
func TestTableBound(t *testing.T) {
	var tb Table
	for i := range MaxRemembered {
		if !tb.Put(model.Key{Domid: 1, Devid: uint32(i)}, Record{Phase: ScriptRan}) {
			t.Fatalf("record %d not kept", i)
		}
	}
	if tb.Put(model.Key{Domid: 2}, Record{Phase: Refused}) {
		t.Error("a record past MaxRemembered was kept")
	}
	if !tb.Put(model.Key{Domid: 3}, Record{Phase: PresetUp, Attached: true}) {
		t.Error("a record with an attachment was not kept")
	}
	if !tb.Put(model.Key{Domid: 1, Devid: 0}, Record{Phase: ScriptRan}) {
		t.Error("replacing a kept record failed")
	}
}
