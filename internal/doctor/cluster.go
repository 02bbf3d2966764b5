package doctor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"xenblkd/internal/api"
	"xenblkd/internal/sanlock"
)

// NameCluster is the cluster mode check's name.
const NameCluster = "cluster"

// clusterOf asks the daemon for its cluster mode configuration (nil: off).
func clusterOf(ctx context.Context, socket string) (*api.Cluster, error) {
	ctx, cancel := context.WithTimeout(ctx, defaultDialTimeout)
	defer cancel()
	resp, err := api.Call(ctx, socket, api.Request{Op: api.OpStatus})
	if err == nil && !resp.OK {
		err = errors.New(resp.Error)
	}
	if err != nil {
		return nil, err
	}
	return resp.Cluster, nil
}

// checkCluster checks, when the daemon runs in cluster mode, that the sanlock
// daemon answers, that this host is in the lockspace, and that the lease
// directory is writable; it reads the lockspace's io_timeout for the record
// (a dead host's leases expire 8*io_timeout+60 s after it stopped).
func checkCluster(ctx context.Context, o *Options) Check {
	c := Check{Name: NameCluster, Severity: Required}
	cl, err := o.Cluster(ctx)
	if err != nil {
		c.Severity, c.Detail = Info, "could not ask the daemon: "+errText(err)
		return c
	}
	if cl == nil {
		c.OK, c.Severity, c.Detail = true, Info, "cluster mode off (no --cluster-lockspace)"
		return c
	}
	client := sanlock.Client{Dir: cl.SanlockDir}
	ls := sanlock.Lockspace{Name: cl.Lockspace, HostID: cl.HostID, Disk: sanlock.Disk{Path: cl.Disk, Offset: cl.Offset}}
	if _, err := client.Version(ctx); err != nil {
		c.Detail = "sanlock daemon at " + cl.SanlockDir + ": " + errText(err)
		c.Fix = "start sanlock (systemctl enable --now wdmd sanlock); see docs/cluster.md"
		return c
	}
	if err := client.InqLockspace(ctx, ls); err != nil {
		c.Detail = fmt.Sprintf("lockspace %s as host %d: %s", cl.Lockspace, cl.HostID, errText(err))
		if errors.Is(err, syscall.ENOENT) {
			c.Fix = "this host is not in the lockspace: restart xenblkd (it joins at start), and check sanlock's log"
		} else {
			c.Fix = "see sanlock's log (journalctl -u sanlock) and docs/cluster.md"
		}
		return c
	}
	ioTimeout, err := client.ReadLockspace(ctx, ls)
	if err != nil {
		c.Detail = fmt.Sprintf("read lockspace %s in %s: %s", cl.Lockspace, cl.Disk, errText(err))
		c.Fix = "check the shared storage"
		return c
	}
	probe, err := os.CreateTemp(cl.LeaseDir, ".xenblkd-doctor-*")
	if err != nil {
		c.Detail = "lease directory " + cl.LeaseDir + ": " + errText(err)
		c.Fix = "the lease files are made there: mount the shared storage read-write"
		return c
	}
	probe.Close()
	os.Remove(probe.Name())
	leases, _ := filepath.Glob(filepath.Join(cl.LeaseDir, "xb-*.lease"))
	c.OK = true
	c.Detail = fmt.Sprintf("in lockspace %s as host %d (%s, io_timeout %d s: a dead host's leases expire after %d s); %d lease file(s) in %s",
		cl.Lockspace, cl.HostID, cl.Disk, ioTimeout, 8*ioTimeout+60, len(leases), cl.LeaseDir)
	return c
}
