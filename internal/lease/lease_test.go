package lease

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"xenblkd/internal/model"
	"xenblkd/test/sanlockd"
)

// TestIntegrationConcurrent drives one manager from many goroutines against
// a real sanlock daemon: read-only backends of one target share its lease,
// writers of distinct targets hold their own, and once every backend went no
// lease is left, in sanlock or in the manager (run it with -race).
func TestIntegrationConcurrent(t *testing.T) {
	d := sanlockd.Start(t)
	dir := t.TempDir()
	share := filepath.Join(dir, "pool")
	if err := os.Mkdir(share, 0o700); err != nil {
		t.Fatal(err)
	}
	ls := sanlockd.NewLockspace(t, d, dir, "xblease", 1)
	ls.HostID = 1
	m := New(Config{Lockspace: ls, Shares: []Share{{Dir: share, Label: "pool"}}, HostName: "h1"}, d.Client(), nil)
	t.Cleanup(func() { m.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := m.Join(ctx); err != nil {
		t.Fatal(err)
	}
	target := func(name string) model.Target {
		return model.Target{Kind: model.RegularFile, Path: filepath.Join(share, name)}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 8 {
		wg.Add(2)
		go func() { // readers of one shared image
			defer wg.Done()
			req := model.LeaseRequest{Key: model.Key{Domid: uint32(10 + i), Devid: 51712}, Target: target("base.img")}
			if err := m.Acquire(ctx, req); err != nil {
				errs <- fmt.Errorf("reader %d: %w", i, err)
			}
		}()
		go func() { // one writer per image
			defer wg.Done()
			req := model.LeaseRequest{Key: model.Key{Domid: uint32(20 + i), Devid: 51712}, Target: target(fmt.Sprintf("vm%d.img", i)), Writable: true}
			if err := m.Acquire(ctx, req); err != nil {
				errs <- fmt.Errorf("writer %d: %w", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	modes := map[string]int{}
	for _, l := range m.Leases() {
		modes[l.Mode] += l.Users
	}
	if modes["shared"] != 8 || modes["exclusive"] != 8 || len(m.Leases()) != 9 {
		t.Fatalf("leases %+v, want 1 shared lease with 8 users and 8 exclusive ones", m.Leases())
	}
	for i := range 8 {
		wg.Add(2)
		go func() {
			defer wg.Done()
			m.Release(model.Key{Domid: uint32(10 + i), Devid: 51712}, target("base.img"))
		}()
		go func() {
			defer wg.Done()
			m.Release(model.Key{Domid: uint32(20 + i), Devid: 51712}, target(fmt.Sprintf("vm%d.img", i)))
		}()
	}
	wg.Wait()
	if got := m.Leases(); len(got) != 0 {
		t.Fatalf("leases left: %+v", got)
	}
	p, err := m.process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if state, n, err := p.Inquire(ctx); err != nil || n != 0 {
		t.Fatalf("sanlock still has %d lease(s) of this process: %q %v", n, state, err)
	}
	if e := m.Events(); e.Acquired != 9 {
		t.Errorf("events %+v, want 9 acquired", e)
	}
}

// TestIntegrationConvert: a writer joining readers on this host converts the
// lease to exclusive; when the writer goes and readers stay, it is shared
// again.
func TestIntegrationConvert(t *testing.T) {
	d := sanlockd.Start(t)
	dir := t.TempDir()
	ls := sanlockd.NewLockspace(t, d, dir, "xbconv", 1)
	ls.HostID = 1
	m := New(Config{Lockspace: ls, Shares: []Share{{Dir: dir}}, HostName: "h1"}, d.Client(), nil)
	t.Cleanup(func() { m.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := m.Join(ctx); err != nil {
		t.Fatal(err)
	}
	tg := model.Target{Kind: model.RegularFile, Path: filepath.Join(dir, "vm.img")}
	reader, writer := model.Key{Domid: 1, Devid: 51712}, model.Key{Domid: 2, Devid: 51712}
	mode := func() string {
		l := m.Leases()
		if len(l) != 1 {
			return fmt.Sprint(l)
		}
		return l[0].Mode
	}
	if err := m.Acquire(ctx, model.LeaseRequest{Key: reader, Target: tg}); err != nil || mode() != "shared" {
		t.Fatalf("reader: %v, mode %s; want shared", err, mode())
	}
	if err := m.Acquire(ctx, model.LeaseRequest{Key: writer, Target: tg, Writable: true}); err != nil || mode() != "exclusive" {
		t.Fatalf("writer: %v, mode %s; want exclusive", err, mode())
	}
	m.Release(writer, tg)
	if mode() != "shared" {
		t.Fatalf("after the writer went: mode %s, want shared", mode())
	}
	m.Release(reader, tg)
	if l := m.Leases(); len(l) != 0 {
		t.Fatalf("leases left: %+v", l)
	}
}
