package daemon

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"

	"xenblkd/internal/api"
	"xenblkd/internal/lease"
)

// SetLeases turns cluster mode on: attachments of shared targets hold
// sanlock leases (internal/lease), status lists them and metrics count them.
// Call it before Recover, which re-adopts the leases of restored attachments.
func (d *Daemon) SetLeases(m *lease.Manager) {
	d.leases = m
	d.model.SetLeases(m)
	held := func(mode string) func() float64 {
		return func() float64 {
			n := 0
			for _, l := range m.Leases() {
				if l.Mode == mode {
					n++
				}
			}
			return float64(n)
		}
	}
	for _, mode := range []string{"exclusive", "shared", "pending"} {
		d.metrics.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "xenblkd_leases",
			Help:        "sanlock leases held for shared targets, by mode (pending: a migration's destination waiting for the source to let go).",
			ConstLabels: prometheus.Labels{"mode": mode},
		}, held(mode)))
	}
	counter := func(name, help string, get func(lease.Events) uint64) {
		d.metrics.Registry.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help},
			func() float64 { return float64(get(m.Events())) }))
	}
	counter("xenblkd_lease_acquired_total", "sanlock leases acquired for shared targets.",
		func(e lease.Events) uint64 { return e.Acquired })
	counter("xenblkd_lease_refused_total", "adds refused because another host holds the target's lease.",
		func(e lease.Events) uint64 { return e.Refused })
	counter("xenblkd_lease_handovers_total", "migrations whose lease passed from the source host to this one.",
		func(e lease.Events) uint64 { return e.HandedOver })
	counter("xenblkd_lease_handovers_overdue_total", "migrations whose lease hand-over took longer than --cluster-handover.",
		func(e lease.Events) uint64 { return e.HandoverOverdue })
}

// releaseOrphans releases the leases a previous daemon left that no restored
// attachment adopted (its guests went while no daemon ran).
func (d *Daemon) releaseOrphans(ctx context.Context) {
	if d.leases == nil {
		return
	}
	if err := d.leases.ReleaseOrphans(ctx); err != nil {
		d.log.Error("recovery: could not release orphaned leases", "err", err)
	}
}

// clusterStatus is cluster mode's configuration, for doctor.
func (d *Daemon) clusterStatus() *api.Cluster {
	if d.leases == nil {
		return nil
	}
	cfg, dir := d.leases.Config(), d.leases.SanlockDir()
	return &api.Cluster{Lockspace: cfg.Lockspace.Name, HostID: cfg.Lockspace.HostID, Disk: cfg.Lockspace.Disk.Path,
		Offset: cfg.Lockspace.Disk.Offset, LeaseDir: cfg.Dir, SanlockDir: dir}
}

// leaseStatus lists the leases held, for status.
func (d *Daemon) leaseStatus() []api.Lease {
	if d.leases == nil {
		return nil
	}
	var out []api.Lease
	for _, l := range d.leases.Leases() {
		out = append(out, api.Lease{Name: l.Name, Identity: l.Identity, Target: l.Target, Mode: l.Mode, Users: l.Users, Since: l.Since})
	}
	return out
}
