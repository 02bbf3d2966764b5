package doctor

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"xenblkd/internal/api"
	"xenblkd/test/sanlockd"
)

func TestClusterCheck(t *testing.T) {
	ctx := context.Background()
	o := fakeOptions(t)
	cluster := func(c *api.Cluster, err error) {
		o.Cluster = func(context.Context) (*api.Cluster, error) { return c, err }
	}

	cluster(nil, nil)
	want(t, checkCluster(ctx, o), true, Info, "cluster mode off")
	cluster(nil, errors.New("no daemon"))
	want(t, checkCluster(ctx, o), false, Info, "could not ask the daemon")
	cluster(&api.Cluster{Lockspace: "ls", HostID: 1, Disk: "/nonexistent", SanlockDir: t.TempDir(), LeaseDir: t.TempDir()}, nil)
	want(t, checkCluster(ctx, o), false, Required, "sanlock daemon at")

	// A real sanlock daemon: not in the lockspace, then in it.
	d := sanlockd.Start(t)
	dir := t.TempDir()
	ls := sanlockd.NewLockspace(t, d, dir, "xbdoctor", 1)
	cl := &api.Cluster{Lockspace: ls.Name, HostID: 1, Disk: ls.Disk.Path, SanlockDir: d.Dir, LeaseDir: dir}
	cluster(cl, nil)
	c := checkCluster(ctx, o)
	want(t, c, false, Required, "lockspace xbdoctor as host 1")
	if !strings.Contains(c.Fix, "not in the lockspace") {
		t.Errorf("fix %q", c.Fix)
	}
	ls.HostID = 1
	actx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := d.Client().AddLockspace(actx, ls, 1); err != nil {
		t.Fatal(err)
	}
	want(t, checkCluster(ctx, o), true, Required, "io_timeout 1 s: a dead host's leases expire after 68 s")
}
