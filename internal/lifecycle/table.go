package lifecycle

import (
	"sync"

	"xenblkd/internal/hotplug"
	"xenblkd/internal/keyed"
	"xenblkd/internal/model"
)

// MaxRemembered bounds the records of backends with nothing attached (a
// refusal, a script that ran). Past it such a record is not kept: a refusal
// is then found again by pre-setup's next event, and the exec'd add decides
// afresh anyway. Records with an attachment are bounded by the model's.
const MaxRemembered = 16384

// Table holds every backend's lock and record. The zero value is ready to use.
type Table struct {
	locks keyed.Mutex[model.Key] // one step at a time per backend; lock order: internal/keyed

	mu         sync.Mutex
	records    map[model.Key]*Record // guarded by mu; only backends with something to remember
	remembered int                   // guarded by mu: records without an attachment (bounded)
	writing    map[model.Key]bool    // guarded by mu: a step holding the backend's lock may write its nodes
}

// Lock serialises the steps of one backend: a step reads the record, decides
// and acts, then writes the next record, all under it.
func (t *Table) Lock(key model.Key) (unlock func()) { return t.locks.Lock(key) }

// Get returns key's record (zero if none).
func (t *Table) Get(key model.Key) Record {
	t.mu.Lock()
	defer t.mu.Unlock()
	if r := t.records[key]; r != nil {
		return *r
	}
	return Record{}
}

// Put records r for key, under key's lock; a zero record forgets the key.
// It reports false if r has no attachment and MaxRemembered such records are
// kept already: r is then not kept.
func (t *Table) Put(key model.Key, r Record) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if old := t.records[key]; old != nil {
		if !old.Attached {
			t.remembered--
		}
		delete(t.records, key)
	}
	if !r.Known() {
		return true
	}
	if !r.Attached {
		if t.remembered >= MaxRemembered {
			return false
		}
		t.remembered++
	}
	if t.records == nil {
		t.records = map[model.Key]*Record{}
	}
	t.records[key] = &r
	return true
}

// StartWriting marks key as written to by a step of ours until end is
// called, so that the watch events of its own writes are not checked (Echo).
func (t *Table) StartWriting(key model.Key) (end func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.writing == nil {
		t.writing = map[model.Key]bool{}
	}
	t.writing[key] = true
	return func() {
		t.mu.Lock()
		delete(t.writing, key)
		t.mu.Unlock()
	}
}

// Echo reports whether a watch event for node (the first name below key's
// backend directory; "" for the directory itself) cannot change what
// pre-setup's step decides, so it need not be checked: while a step of ours
// writes the backend, the nodes it writes; once pre-setup attached the
// backend or its script ran, anything but the directory and the nodes libxl
// writes to (re)create it, as the step then only looks for the backend
// being gone.
func (t *Table) Echo(key model.Key, node string) bool {
	if hotplug.Creates(node) {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.writing[key] && hotplug.WrittenByConnect(node) {
		return true
	}
	r := t.records[key]
	return r != nil && (r.Phase == PresetUp || r.Phase == ScriptRan)
}

// Keys returns the backends with a record (all, or one domain's): those
// whose going away must be noticed.
func (t *Table) Keys(domid uint32, all bool) []model.Key {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []model.Key
	for k := range t.records {
		if all || k.Domid == domid {
			out = append(out, k)
		}
	}
	return out
}
