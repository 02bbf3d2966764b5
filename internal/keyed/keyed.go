// Package keyed provides a mutex per key, created on demand and dropped when
// no one holds or waits for it.
//
// The daemon's locks, in the one order they are taken (a lock is never
// taken while holding one later in this list):
//
//  0. the recovery lock (daemon: Daemon.recovering), held across one whole
//     recovery or adoption, which takes backend locks one at a time;
//  1. the backend lock (lifecycle.Table: a Mutex by backend), held across
//     one whole lifecycle step of a backend: snapshot, decision, action;
//  2. the target locks (model: a Mutex by target), held across the slow work
//     of one add or remove (sharing checks, loop setup); an add takes all of
//     its target's locks at once with LockAll, in one global order;
//  3. the lease locks (internal/lease: a Mutex by lease name), held across
//     the sanlock requests of one acquire or release, taken under a target
//     lock (cluster mode only);
//  4. the leaf mutexes guarding maps (model.mu, the lifecycle table's, the
//     daemon's label cache's, a Mutex's own): never held across I/O or while
//     taking another lock.
package keyed

import "sync"

// Mutex is a mutex per key. The zero value is ready to use.
type Mutex[K comparable] struct {
	mu    sync.Mutex
	locks map[K]*entry // guarded by mu
}

type entry struct {
	mu   sync.Mutex
	refs int // guarded by Mutex.mu: holders and waiters
}

// Lock locks key's mutex and returns its unlock.
func (m *Mutex[K]) Lock(key K) (unlock func()) {
	m.mu.Lock()
	if m.locks == nil {
		m.locks = map[K]*entry{}
	}
	e := m.locks[key]
	if e == nil {
		e = &entry{}
		m.locks[key] = e
	}
	e.refs++
	m.mu.Unlock()

	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		m.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(m.locks, key)
		}
		m.mu.Unlock()
	}
}

// LockAll locks each of keys in the order given, which must be one order
// every caller agrees on (so that two callers sharing some keys never wait on
// each other crosswise), and returns the unlock of them all.
func (m *Mutex[K]) LockAll(keys []K) (unlock func()) {
	unlocks := make([]func(), len(keys))
	for i, k := range keys {
		unlocks[i] = m.Lock(k)
	}
	return func() {
		for i := len(unlocks) - 1; i >= 0; i-- {
			unlocks[i]()
		}
	}
}
