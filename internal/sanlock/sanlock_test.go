package sanlock_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"xenblkd/internal/sanlock"
	"xenblkd/test/sanlockd"
)

// twoHosts starts two sanlock daemons joined to one fresh lockspace with
// io_timeout 1 s, as hosts 1 and 2, joining concurrently (each join takes
// 2*io_timeout).
func twoHosts(t *testing.T) (a, b *sanlockd.Daemon, lsA, lsB sanlock.Lockspace, dir string) {
	t.Helper()
	a, b = sanlockd.Start(t), sanlockd.Start(t)
	dir = t.TempDir()
	ls := sanlockd.NewLockspace(t, a, dir, "xbtest", 1)
	lsA, lsB = ls, ls
	lsA.HostID, lsB.HostID = 1, 2
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, h := range []struct {
		d  *sanlockd.Daemon
		ls sanlock.Lockspace
	}{{a, lsA}, {b, lsB}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = h.d.Client().AddLockspace(ctx, h.ls, 0)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("add_lockspace: %v\n%s\n%s", err, a.LogTail(), b.LogTail())
	}
	return a, b, lsA, lsB, dir
}

func newResource(t *testing.T, d *sanlockd.Daemon, ls sanlock.Lockspace, dir, name string) sanlock.Resource {
	t.Helper()
	path := filepath.Join(dir, name+".lease")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	r := sanlock.Resource{Lockspace: ls.Name, Name: name, Disk: sanlock.Disk{Path: path}}
	if err := d.Client().WriteResource(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestIntegrationTwoHosts drives the real daemon through the client: an
// exclusive lease refuses the other host and names it among the owners,
// shared leases coexist, release frees, and a persistent lease outlives its
// process as an orphan that the next process adopts.
func TestIntegrationTwoHosts(t *testing.T) {
	a, b, lsA, _, dir := twoHosts(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	if err := a.Client().InqLockspace(ctx, lsA); err != nil {
		t.Fatalf("inq_lockspace on a joined host: %v", err)
	}
	if err := a.Client().InqLockspace(ctx, sanlock.Lockspace{Name: "nosuch", HostID: 1}); !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("inq_lockspace of an unknown lockspace: got %v, want ENOENT", err)
	}
	// get_hosts answers EAGAIN until the daemon has watched the other
	// hosts' delta leases for a while after joining (38 s here).
	if hosts, err := a.Client().Hosts(ctx, lsA.Name, 0); err != nil && !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("get_hosts: %v %+v", err, hosts)
	}

	r := newResource(t, a, lsA, dir, "disk1")
	pa, err := a.Client().Register(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer pa.Close()
	pb, err := b.Client().Register(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer pb.Close()

	if err := pa.Acquire(ctx, r, sanlock.AcquireOwnerNoWait, "host1-vm"); err != nil {
		t.Fatalf("acquire on host 1: %v\n%s", err, a.LogTail())
	}
	err = pb.Acquire(ctx, r, sanlock.AcquireOwnerNoWait, "host2-vm")
	if !sanlock.Held(err) {
		t.Fatalf("acquire on host 2 of host 1's lease: got %v, want held", err)
	}
	owners, err := b.Client().ReadResourceOwners(ctx, r)
	if err != nil || len(owners) != 1 || owners[0].ID != 1 {
		t.Fatalf("read_resource_owners: got %+v, %v; want host 1", owners, err)
	}
	state, n, err := pa.Inquire(ctx)
	if err != nil || n != 1 {
		t.Fatalf("inquire: %q %d %v", state, n, err)
	}
	if err := pa.Release(ctx, r, 0); err != nil {
		t.Fatal(err)
	}
	if err := pb.Acquire(ctx, r, sanlock.AcquireOwnerNoWait, "host2-vm"); err != nil {
		t.Fatalf("acquire on host 2 after host 1 released: %v", err)
	}
	if err := pb.Release(ctx, r, 0); err != nil {
		t.Fatal(err)
	}

	// Shared leases on both hosts; an exclusive one is then refused.
	sh := r
	sh.Flags = sanlock.ResShared
	if err := pa.Acquire(ctx, sh, sanlock.AcquireOwnerNoWait, ""); err != nil {
		t.Fatalf("shared acquire on host 1: %v", err)
	}
	if err := pb.Acquire(ctx, sh, sanlock.AcquireOwnerNoWait, ""); err != nil {
		t.Fatalf("shared acquire on host 2: %v\n%s", err, b.LogTail())
	}
	if err := pb.Convert(ctx, r, sanlock.AcquireOwnerNoWait); err == nil {
		t.Fatal("host 2 converted to exclusive while host 1 holds the lease shared")
	}
	if err := pa.Release(ctx, sh, 0); err != nil {
		t.Fatal(err)
	}
	if err := pb.Convert(ctx, r, sanlock.AcquireOwnerNoWait); err != nil {
		t.Fatalf("convert to exclusive once alone: %v", err)
	}
	if err := pb.Release(ctx, r, 0); err != nil {
		t.Fatal(err)
	}

	// A persistent lease survives its process (an orphan) and is adopted.
	p := r
	p.Flags = sanlock.ResPersistent
	if err := pa.Acquire(ctx, p, sanlock.AcquireOwnerNoWait, ""); err != nil {
		t.Fatal(err)
	}
	pa.Close()
	if err := pb.Acquire(ctx, r, sanlock.AcquireOwnerNoWait, ""); !sanlock.Held(err) {
		t.Fatalf("acquire of host 1's orphan from host 2: got %v, want held", err)
	}
	pa2, err := a.Client().Register(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer pa2.Close()
	if err := pa2.Acquire(ctx, p, sanlock.AcquireOrphanOnly, ""); err != nil {
		t.Fatalf("adopt the orphan: %v\n%s", err, a.LogTail())
	}
	if err := pa2.Release(ctx, p, 0); err != nil {
		t.Fatal(err)
	}
}
