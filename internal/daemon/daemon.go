// Package daemon wires the model, loop devices and XenStore together and
// serves the local API (internal/api) on a unix socket.
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
	"fmt"
	"log/slog"
	"time"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/loop"
	"xenblkd/internal/model"
)

// DefaultTag prefixes lo_file_name of every loop device the daemon makes.
const DefaultTag = "xenblkd:"

// RequestTimeout bounds one add or remove, below libxl's 40 s SIGKILL of the
// hotplug script, so the error still reaches hotplug-error.
const RequestTimeout = 30 * time.Second

// Daemon handles add, remove and status requests.
type Daemon struct {
	log     *slog.Logger
	store   hotplug.Store
	model   *model.Model
	metrics *Metrics // metrics.go

	backends backendTable // presetup.go: per-backend lock and pre-setup state

	// Scripts says which backends are ours (scripts.go); set it before
	// Recover and StartPresetup, which both decide by it.
	Scripts Scripts

	tag string // lo_file_name prefix of our devices, as Recover was told (claims of stock devices use it)
}

// New returns a daemon on store (XenStore) and host (loop devices, mounts).
func New(log *slog.Logger, store hotplug.Store, host model.Host) *Daemon {
	m := model.New(host, log)
	return &Daemon{log: log, store: store, model: m, metrics: newMetrics(m)}
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
		ctx, cancel := context.WithTimeout(ctx, 5*RequestTimeout)
		defer cancel()
		sum, err := d.AdoptStock(ctx) // stock.go
		if err != nil {
			return api.Response{Error: err.Error()}
		}
		return api.Response{OK: true, Summary: fmt.Sprintf("took over %d loop device(s) of the stock block script; %d left alone (see the daemon's log); %d attachment(s) restored",
			sum.Stock, sum.Foreign+sum.Mismatched, sum.Restored)}
	case api.OpPing:
		return api.Response{OK: true}
	case api.OpAdd, api.OpRemove:
	default:
		return api.Response{Error: fmt.Sprintf("unknown operation %q: expected add, remove, status, adopt or ping", model.Quote(req.Op, 32))}
	}
	defer d.metrics.timeRequest(req.Op)()
	b, err := hotplug.ParseBackendPath(req.Path)
	if err != nil {
		d.metrics.countError(req.Op, withReason(ReasonBadParams, err))
		return api.Response{Error: err.Error()}
	}
	ctx, cancel := context.WithTimeout(ctx, RequestTimeout)
	defer cancel()
	if req.Op == api.OpRemove {
		d.hotplugRemove(ctx, b) // presetup.go
		return api.Response{OK: true}
	}
	a, err := d.hotplugAdd(ctx, b) // presetup.go
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

// Who made an add's decision, for its log line (by=).
const (
	byScript   = "script"   // the hotplug entry libxl exec'd
	byPresetup = "presetup" // pre-setup, before libxl exec'd the script
)

func (d *Daemon) add(ctx context.Context, b hotplug.Backend, by string) (*api.Attachment, error) {
	start := time.Now()
	log := d.log.With("domid", b.Domid, "devid", b.Devid)
	req, err := hotplug.ReadRequest(ctx, d.store, b)
	if err != nil {
		err = withReason(ReasonBadParams, err)
		d.refused(ctx, b, "", by, err)
		return nil, err
	}
	key := model.Key{Domid: b.Domid, Devid: b.Devid}
	if req.PhysicalDevice != "" {
		// Called twice, or the daemon set it up already: nothing to do.
		log.Debug("add: physical-device already set, nothing to do", "physical_device", req.PhysicalDevice)
		if a, ok := d.model.Lookup(key); ok {
			return toAPI(a), nil
		}
		return nil, nil
	}
	params := model.Quote(req.Params, 200)
	mode, err := model.ParseMode(req.Mode)
	if err != nil {
		err = withReason(ReasonBadParams, err)
		d.refused(ctx, b, params, by, err)
		return nil, err
	}
	backing, target, err := openTarget(req.Params, mode.Writable)
	if err != nil {
		err = withReason(ReasonBadParams, err)
		d.refused(ctx, b, params, by, err)
		return nil, err
	}
	defer backing.Close() // the loop device keeps its own reference
	for _, why := range req.Frontend.Ignored {
		log.Warn("not trusted for the same-VM sharing exception", "node", why)
	}
	for _, why := range req.Frontend.Unreadable { // the rule in a driver domain: at debug level
		log.Debug("not trusted for the same-VM sharing exception: unreadable", "node", why)
	}
	a, err := d.model.Add(ctx, model.AddRequest{Key: key, Params: req.Params, Mode: mode, Target: target,
		Domain: domainOf(req.Frontend), Backing: backing})
	if err != nil {
		d.refused(ctx, b, params, by, err)
		return nil, err
	}
	err = hotplug.Connect(ctx, d.store, b, hotplug.Result{Rdev: a.Rdev, DevPath: a.DevPath, DiskSeq: a.DiskSeq})
	if err != nil {
		d.model.Remove(key)
		err = withReason(ReasonXenStore, err)
		d.refused(ctx, b, params, by, err)
		return nil, err
	}
	d.metrics.attached(a)
	d.decision(ctx, slog.LevelInfo, "attached", diskLine{b: b, target: target.Path, dev: a.DevPath, diskseq: a.DiskSeq},
		"mode", mode, "kind", target.Kind.String(), "io", a.IO.String(), "users", a.Users, "by", by, "took", time.Since(start))
	return toAPI(a), nil
}

// remove releases the backend's attachment (from our own record: the
// backend's nodes may be gone) and removes physical-device if still there.
func (d *Daemon) remove(ctx context.Context, b hotplug.Backend) {
	log := d.log.With("domid", b.Domid, "devid", b.Devid)
	if _, ours := d.model.Lookup(model.Key{Domid: b.Domid, Devid: b.Devid}); !ours {
		// Attached by the stock block script before a takeover and not
		// adopted yet (stock.go): free its device as the stock remove would.
		if found, err := d.releaseStock(ctx, b); found && err != nil {
			log.Error("remove: the stock script's loop device does not check out; not freeing it", "err", err)
		}
	}
	// physical-device goes first: a crash between the two steps then leaves a
	// held device no backend names (recovery closes it), never a node naming
	// a device that is gone.
	if err := hotplug.Disconnect(ctx, d.store, b); err != nil {
		log.Warn("remove: could not clear physical-device", "err", err)
		d.metrics.countError(api.OpRemove, withReason(ReasonXenStore, err))
	}
	a, found := d.model.Remove(model.Key{Domid: b.Domid, Devid: b.Devid})
	if found {
		d.decision(ctx, slog.LevelInfo, "released", diskLine{b: b, target: a.Target.Path, dev: a.DevPath, diskseq: a.DiskSeq},
			"users_left", a.Users)
	} else {
		log.Info("remove: not attached here, nothing to release")
	}
}

// domainOf is the model's view of what the toolstack says about a domain.
func domainOf(fe hotplug.Frontend) model.Domain {
	return model.Domain{VM: fe.VM, TargetVM: fe.TargetVM}
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
