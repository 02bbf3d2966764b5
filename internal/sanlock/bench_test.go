package sanlock_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"xenblkd/internal/sanlock"
	"xenblkd/test/sanlockd"
)

// BenchmarkAcquireRelease measures one exclusive acquire plus release of a
// resource lease on a real sanlock daemon (one host, lockspace file on the
// test's file system), through this package's socket client and through
// exec'ing `sanlock client` as a shell-out alternative would:
//
//	go test -run XXX -bench AcquireRelease ./internal/sanlock
func BenchmarkAcquireRelease(b *testing.B) {
	d := sanlockd.Start(b)
	dir := b.TempDir()
	ls := sanlockd.NewLockspace(b, d, dir, "xbbench", 1)
	ls.HostID = 1
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := d.Client().AddLockspace(ctx, ls, 0); err != nil {
		b.Fatal(err)
	}
	path := dir + "/r.lease"
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		b.Fatal(err)
	}
	r := sanlock.Resource{Lockspace: ls.Name, Name: "r", Disk: sanlock.Disk{Path: path}}
	if err := d.Client().WriteResource(ctx, r); err != nil {
		b.Fatal(err)
	}
	p, err := d.Client().Register(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()

	b.Run("socket", func(b *testing.B) {
		for b.Loop() {
			if err := p.Acquire(ctx, r, 0, ""); err != nil {
				b.Fatal(err)
			}
			if err := p.Release(ctx, r, 0); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("exec", func(b *testing.B) {
		spec := fmt.Sprintf("%s:%s:%s:0", ls.Name, r.Name, path)
		pid := fmt.Sprint(os.Getpid()) // registered by p
		for b.Loop() {
			for _, op := range []string{"acquire", "release"} {
				cmd := exec.Command(sanlockd.Bin, "client", op, "-r", spec, "-p", pid)
				cmd.Env = d.Env()
				if out, err := cmd.CombinedOutput(); err != nil {
					b.Fatalf("sanlock client %s: %v: %s", op, err, out)
				}
			}
		}
	})
}
