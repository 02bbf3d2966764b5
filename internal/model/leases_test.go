package model_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"

	. "xenblkd/internal/model"
	"xenblkd/internal/model/modeltest"
)

// fakeLeases records the model's calls to its Leases, and refuses the
// targets in refuse.
type fakeLeases struct {
	mu     sync.Mutex
	calls  []string
	refuse map[string]bool
}

func (l *fakeLeases) Acquire(ctx context.Context, req LeaseRequest) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	mode := "r"
	if req.Writable {
		mode = "w"
	}
	l.calls = append(l.calls, "acquire "+req.Key.String()+" "+req.Target.Path+" "+mode)
	if l.refuse[req.Target.Path] {
		return &ConflictError{Key: req.Key, Target: req.Target, Reason: "another host holds it"}
	}
	return nil
}

func (l *fakeLeases) Release(key Key, t Target) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls = append(l.calls, "release "+key.String()+" "+t.Path)
}

func (l *fakeLeases) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	c := l.calls
	l.calls = nil
	return c
}

// TestLeasesFollowAttachments: the lease is asked for after the local rules
// allow an add (never for a local refusal, never for w!), a refused lease
// leaves nothing attached, and Remove and Restore release and re-take it.
func TestLeasesFollowAttachments(t *testing.T) {
	h := &modeltest.Host{}
	m := New(h, nil)
	l := &fakeLeases{refuse: map[string]bool{image2.Path: true}}
	m.SetLeases(l)

	if _, err := add(t, m, 1, 51712, image, rw); err != nil {
		t.Fatal(err)
	}
	if _, err := add(t, m, 2, 51712, image, rw); !errors.Is(err, ErrConflict) {
		t.Fatalf("second writer: %v, want a local conflict", err)
	}
	if got, want := l.take(), []string{"acquire domain 1 device 51712 /srv/img w"}; !slices.Equal(got, want) {
		t.Fatalf("calls %q, want %q (a local refusal asks no lease)", got, want)
	}
	if _, err := add(t, m, 3, 51712, image2, rw); !errors.Is(err, ErrConflict) {
		t.Fatalf("lease refused: %v, want ErrConflict", err)
	}
	if _, ok := m.Lookup(Key{3, 51712}); ok || h.Open() != 1 {
		t.Fatalf("a refused lease left an attachment or a loop device (%d open)", h.Open())
	}
	if _, err := add(t, m, 4, 51712, image2, force); err != nil {
		t.Fatal(err)
	}
	m.Remove(Key{4, 51712})
	m.Remove(Key{1, 51712})
	if got, want := l.take(), []string{"acquire domain 3 device 51712 /srv/img2 w", "release domain 1 device 51712 /srv/img"}; !slices.Equal(got, want) {
		t.Fatalf("calls %q, want %q (w! takes and releases none)", got, want)
	}
	dev, _ := h.NewLoop(nil, false)
	if err := m.Restore(Attachment{Key: Key{5, 51712}, Mode: rw, Target: image}, dev); err != nil {
		t.Fatal(err)
	}
	if got, want := l.take(), []string{"acquire domain 5 device 51712 /srv/img w"}; !slices.Equal(got, want) {
		t.Fatalf("calls %q, want %q", got, want)
	}
}
