package keyed

import (
	"sync"
	"testing"
)

func TestMutexSerialisesPerKey(t *testing.T) {
	var m Mutex[int]
	var wg sync.WaitGroup
	counts := make([]int, 4)
	for i := range 400 {
		wg.Go(func() {
			k := i % len(counts)
			unlock := m.Lock(k)
			counts[k]++ // the race detector catches two holders of one key
			unlock()
		})
	}
	wg.Wait()
	for k, n := range counts {
		if n != 100 {
			t.Errorf("key %d: %d increments, want 100", k, n)
		}
	}
	if n := m.held(); n != 0 {
		t.Errorf("%d entries left after every unlock, want 0", n)
	}
}

func TestLockAllOtherKeysFree(t *testing.T) {
	var m Mutex[string]
	unlock := m.LockAll([]string{"a", "b"})
	done := make(chan struct{})
	go func() { m.Lock("c")(); close(done) }()
	<-done // "c" is not blocked by "a" and "b"
	got := make(chan struct{})
	go func() { m.Lock("b")(); close(got) }()
	select {
	case <-got:
		t.Fatal("b locked twice")
	default:
	}
	unlock()
	<-got
	if n := m.held(); n != 0 {
		t.Errorf("%d entries left, want 0", n)
	}
}

// held returns how many keys have an entry.
func (m *Mutex[K]) held() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.locks)
}
