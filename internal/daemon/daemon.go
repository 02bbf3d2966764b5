// Package daemon wires the model, loop devices and XenStore together: it
// answers the local API (internal/api; internal/server serves it), carries
// out each backend's lifecycle (internal/lifecycle decides), runs pre-setup's
// watch and recovery, and keeps the Prometheus metrics (internal/metrics
// serves them).
//
// The daemon holds the fd of every loop device it made for as long as a
// backend uses it; with AUTOCLEAR that is what keeps a device bound until
// xen-blkback has it. On exit the fds close by themselves: a device blkback
// already opened stays bound, one it has not opened yet is freed, unless
// systemd's fd store keeps a copy (recovery.go pushes each new device there
// and Recover takes the copies back and rebuilds attachments from XenStore).
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/lease"
	"xenblkd/internal/lifecycle"
	"xenblkd/internal/loop"
	"xenblkd/internal/model"
	"xenblkd/internal/text"
)

// Daemon handles add, remove and status requests.
type Daemon struct {
	log     *slog.Logger
	store   hotplug.Store
	model   *model.Model
	metrics *Metrics // metrics.go
	loops   Loops    // host.go: the devices recovery re-opens and adoption claims

	// recovering is held across one recovery (Recover, AdoptStock): its
	// steps of origin FromRecovery, and only they, use run.
	recovering sync.Mutex
	run        *recoveryRun // guarded by recovering

	backends lifecycle.Table // every backend's lock and record
	labels   labelCache      // logattrs.go: the domain names and vdevs of log lines

	// Scripts says which backends are ours (scripts.go); set it before
	// Recover and StartPresetup, which both decide by it.
	Scripts Scripts

	leases *lease.Manager // cluster mode (cluster.go); nil: off
}

// New returns a daemon on store (XenStore) and host (loop devices, mounts;
// if host is Loops too, recovery and adoption reach devices through it,
// else they cannot take any over).
func New(log *slog.Logger, store hotplug.Store, host model.Host) *Daemon {
	m := model.New(host, log)
	loops, ok := host.(Loops)
	if !ok {
		loops = noLoops{}
	}
	return &Daemon{loops: loops, log: log, store: store, model: m, metrics: newMetrics(m), labels: labelCache{store: store}}
}

// NewHost returns the real machine: loop devices tagged with tag, doing I/O
// as io says (iomode.go), mounts from /proc/self/mountinfo, and the sharing
// check on an index of loop devices by backing file (loop.Index; a scan of
// every device if the uevent socket cannot be opened). It lives as long as
// the process.
func NewHost(tag string, io IOPolicy, log *slog.Logger) model.Host {
	h := &loopHost{tag: tag, mountinfo: "/proc/self/mountinfo", io: io, log: log}
	ix, err := loop.NewIndex()
	if err != nil {
		log.Warn("sharing check: no loop device index; every add scans all loop devices", "err", err)
	} else {
		h.index = ix
	}
	return h
}

// Handle answers one API request.
func (d *Daemon) Handle(ctx context.Context, req api.Request) api.Response {
	switch req.Op {
	case api.OpStatus:
		return d.statusResponse(ctx) // status.go
	case api.OpAdopt:
		sum, err := d.AdoptStock(ctx) // stock.go: each backend bounded by api.RequestTimeout
		if err != nil {
			return api.Response{Error: err.Error()}
		}
		return api.Response{OK: true, Summary: fmt.Sprintf("took over %d loop device(s) of the stock block script; %d left alone (see the daemon's log); %d attachment(s) restored",
			sum.Stock, sum.Foreign+sum.Mismatched, sum.Restored)}
	case api.OpPing:
		return api.Response{OK: true}
	case api.OpAdd, api.OpRemove:
	default:
		return api.Response{Error: fmt.Sprintf("unknown operation %q: expected add, remove, status, adopt or ping", text.Truncate(req.Op, 32))}
	}
	defer d.metrics.timeRequest(req.Op)()
	b, err := hotplug.ParseBackendPath(req.Path)
	if err != nil {
		d.metrics.countError(req.Op, withReason(ReasonBadParams, err))
		return api.Response{Error: err.Error()}
	}
	ctx, cancel := context.WithTimeout(ctx, api.RequestTimeout)
	defer cancel()
	if req.Op == api.OpRemove {
		d.step(ctx, b, lifecycle.FromRemove) // act.go
		return api.Response{OK: true}
	}
	a, err := d.step(ctx, b, lifecycle.FromAdd)
	if err != nil {
		d.metrics.countError(api.OpAdd, err)
		resp := api.Response{Error: err.Error()}
		if werr := hotplug.Fail(ctx, d.store, b, err.Error()); werr != nil {
			d.log.Error("could not record hotplug-error", "domid", b.Domid, "devid", b.Devid, "err", werr)
		} else {
			resp.ErrorRecorded = true
		}
		return resp
	}
	return api.Response{OK: true, Attachment: a}
}

// noLoops is the Loops of a host that has none.
type noLoops struct{}

func (noLoops) Reopen(int, uint64) (HeldLoop, error) {
	return nil, errors.New("this host cannot re-open loop devices")
}

func (noLoops) Claim(int, model.FileID) (HeldLoop, error) {
	return nil, errors.New("this host cannot claim loop devices")
}

func toAPI(a model.Attachment) *api.Attachment {
	return &api.Attachment{
		Domid: a.Key.Domid, Devid: a.Key.Devid, Target: a.Params, Kind: a.Target.Kind.String(),
		Mode: a.Mode.String(), Device: a.DevPath, PhysicalDevice: hotplug.FormatRdev(a.Rdev),
		DiskSeq: a.DiskSeq, Users: a.Users, Since: a.Since,
		IO: ioName(a.IO), BlockSize: a.IO.BlockSize,
	}
}

// ioName is the API's io field: "direct", "buffered", or "" for a block device.
func ioName(io model.IOMode) string {
	switch {
	case io.BlockSize == 0:
		return ""
	case io.DirectIO:
		return "direct"
	}
	return "buffered"
}
