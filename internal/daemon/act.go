package daemon

import (
	"context"
	"log/slog"
	"time"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/model"
	"xenblkd/internal/text"
)

// step runs one lifecycle step of backend b for origin o (lifecycle.go):
// snapshot, decide, act, all under the backend's lock. run is the recovery
// in progress (fromRecovery only).
func (d *Daemon) step(ctx context.Context, b hotplug.Backend, o origin, run *recoveryRun) (*api.Attachment, error) {
	start := time.Now()
	key := keyOf(b)
	unlock := d.backends.lock(key)
	defer unlock()
	a, attached := d.model.Lookup(key)
	f := facts{hold: holding{attached: attached, attachment: a, state: d.backends.get(key)}, snap: hotplug.Snapshot{Backend: b}}
	if nodes := nodesFor(o, f.hold); nodes != 0 {
		f.snap = hotplug.ReadSnapshot(ctx, d.store, b, nodes)
		f.ours = f.snap.Has(hotplug.Script) && d.Scripts.Ours(f.snap.Value(hotplug.Script))
	}
	dec := decide(o, f)
	switch {
	case dec.do == doConfirm: // act logs it, with more
	case dec.do != doNothing || o != fromPresetup: // pre-setup's "nothing" is most events
		d.log.Debug("lifecycle", "domid", b.Domid, "devid", b.Devid, "origin", o.String(), "action", dec.do.String(), "why", dec.why)
	}
	if o == fromRemove {
		// Remembered first so that pre-setup does not attach the backend
		// again while its directory lingers without physical-device.
		d.backends.set(key, backendState{scriptRan: true})
	}
	if o == fromAdd || dec.do == doAttach {
		// Ends after remember set the state: no gap for our own events.
		defer d.backends.startWriting(key)()
	}
	done, err := d.act(ctx, o, f, dec, run)
	d.remember(o, f, dec, done, err, start)
	return done, err
}

// act carries out dec.
func (d *Daemon) act(ctx context.Context, o origin, f facts, dec decision, run *recoveryRun) (*api.Attachment, error) {
	b := f.snap.Backend
	switch dec.do {
	case doAttach:
		return d.attach(ctx, f.snap, o)
	case doConfirm:
		if !f.hold.attached {
			return nil, nil // physical-device written by someone else: nothing of ours
		}
		a := f.hold.attachment // looked up under this same lock by step
		d.log.Debug("add: confirmed", "domid", b.Domid, "devid", b.Devid, "dev", a.DevPath, "diskseq", a.DiskSeq, "why", dec.why)
		return toAPI(a), nil
	case doRefuse:
		return nil, d.refuse(ctx, f.snap, o, dec.err)
	case doReleaseStock:
		if err := d.releaseStock(f.snap); err != nil { // stock.go
			d.log.Error("remove: the stock script's loop device does not check out; not freeing it",
				"domid", b.Domid, "devid", b.Devid, "err", err)
		}
		d.detach(ctx, b)
	case doDetach:
		d.detach(ctx, b)
	case doRelease:
		d.release(b, f.hold)
	case doRestore, doAdoptStock:
		return nil, d.restore(ctx, f.snap, dec.do == doAdoptStock, run) // recovery.go
	}
	return nil, nil
}

// refuse reports a request that cannot be acted on.
func (d *Daemon) refuse(ctx context.Context, s hotplug.Snapshot, o origin, err error) error {
	if o == fromRecovery {
		return err // Recover logs it per backend
	}
	err = withReason(ReasonBadParams, err)
	d.refused(ctx, diskLine{b: s.Backend, labels: labelsOf(s)}, byOrigin(o), err)
	return err
}

// remember records what pre-setup must know of the backend after the step.
func (d *Daemon) remember(o origin, f facts, dec decision, a *api.Attachment, err error, start time.Time) {
	key := keyOf(f.snap.Backend)
	switch {
	case o == fromAdd:
		d.backends.set(key, backendState{scriptRan: true})
	case o != fromPresetup || dec.do != doAttach:
	case err == nil && a != nil:
		d.metrics.presetupAttached(start)
		d.backends.set(key, backendState{presetup: true})
		d.log.Debug("pre-setup: attached before the script ran", "domid", key.Domid, "devid", key.Devid, "dev", a.Device, "diskseq", a.DiskSeq)
	case err == nil:
		d.backends.set(key, backendState{}) // physical-device appeared meanwhile: nothing of ours
	case transient(err):
		d.backends.set(key, backendState{})
		d.log.Warn("pre-setup failed; the script's add will retry", "domid", key.Domid, "devid", key.Devid, "err", err)
	default:
		// Remembered so that pre-setup does not try again on every event; the
		// exec'd add decides afresh, and reports (hotplug-error, the warning):
		// libxl reads hotplug-error only after the script failed, and the
		// backend may still go away unused.
		fl := &presetupFailure{params: f.snap.Value(hotplug.Params), mode: f.snap.Value(hotplug.Mode)}
		if !d.backends.set(key, backendState{failure: fl}) {
			d.log.Warn("pre-setup: too many failures remembered; the script's add will retry", "domid", key.Domid, "devid", key.Devid)
		}
	}
}

// Who made an add's decision, for its log line (by=).
const (
	byScript   = "script"   // the hotplug entry libxl exec'd
	byPresetup = "presetup" // pre-setup, before libxl exec'd the script
)

func byOrigin(o origin) string {
	if o == fromPresetup {
		return byPresetup
	}
	return byScript
}

// attach opens params, attaches it in the model and writes physical-device.
func (d *Daemon) attach(ctx context.Context, s hotplug.Snapshot, o origin) (*api.Attachment, error) {
	start := time.Now()
	b, by := s.Backend, byOrigin(o)
	req, err := s.Request() // checked by decide
	if err != nil {
		return nil, d.refuse(ctx, s, o, err)
	}
	line := diskLine{b: b, target: text.Truncate(req.Params, 200), labels: labelsOf(s)}
	refuse := func(err error) (*api.Attachment, error) {
		d.refused(ctx, line, by, err)
		return nil, err
	}
	mode, err := model.ParseMode(req.Mode)
	if err != nil {
		return refuse(withReason(ReasonBadParams, err))
	}
	backing, target, err := openTarget(req.Params, mode.Writable)
	if err != nil {
		return refuse(withReason(ReasonBadParams, err))
	}
	defer backing.Close() // the loop device keeps its own reference
	key := keyOf(b)
	a, err := d.model.Add(ctx, model.AddRequest{Key: key, Params: req.Params, Mode: mode, Target: target,
		Backing: backing, Domains: d.domain})
	if err != nil {
		return refuse(err)
	}
	res := hotplug.Result{Rdev: a.Rdev, DevPath: a.DevPath, DiskSeq: a.DiskSeq, ClearError: s.Has(hotplug.HotplugError)}
	if line.labels == nil { // pre-setup's snapshot: the log line's labels come with the writes
		res.Labels = &hotplug.Labels{}
		line.labels = res.Labels
	}
	err = hotplug.Connect(ctx, d.store, b, res)
	if err != nil {
		d.model.Remove(key)
		return refuse(withReason(ReasonXenStore, err))
	}
	d.metrics.attached(a)
	line.target, line.dev, line.diskseq = target.Path, a.DevPath, a.DiskSeq
	d.decision(ctx, slog.LevelInfo, "attached", line,
		"mode", mode, "kind", target.Kind.String(), "io", a.IO.String(), "users", a.Users, "by", by, "took", time.Since(start))
	return toAPI(a), nil
}

// domain is what the toolstack says about domid, read only when the sharing
// rules ask (a writable target shared across domains).
func (d *Daemon) domain(ctx context.Context, domid uint32) model.Domain {
	fe := hotplug.ReadFrontend(ctx, d.store, domid)
	for _, why := range fe.Ignored {
		d.log.Warn("not trusted for the same-VM sharing exception", "domid", domid, "node", why)
	}
	for _, why := range fe.Unreadable { // the rule in a driver domain: at debug level
		d.log.Debug("not trusted for the same-VM sharing exception: unreadable", "domid", domid, "node", why)
	}
	return model.Domain{VM: fe.VM, TargetVM: fe.TargetVM}
}

// detach releases the backend's attachment (from our own record: the
// backend's nodes may be gone) and removes physical-device if still there.
func (d *Daemon) detach(ctx context.Context, b hotplug.Backend) {
	// physical-device goes first: a crash between the two steps then leaves a
	// held device no backend names (recovery closes it), never a node naming
	// a device that is gone.
	var lb hotplug.Labels
	if err := hotplug.Disconnect(ctx, d.store, b, &lb); err != nil {
		d.log.Warn("remove: could not clear physical-device", "domid", b.Domid, "devid", b.Devid, "err", err)
		d.metrics.countError(api.OpRemove, withReason(ReasonXenStore, err))
	}
	a, found := d.model.Remove(keyOf(b))
	if !found {
		d.log.Info("remove: not attached here, nothing to release", "domid", b.Domid, "devid", b.Devid)
		return
	}
	d.decision(ctx, slog.LevelInfo, "released", diskLine{b: b, labels: &lb, target: a.Target.Path, dev: a.DevPath, diskseq: a.DiskSeq},
		"users_left", a.Users)
}

// release forgets a backend whose directory is gone, and drops what we hold
// for it: what pre-setup made for a backend removed before its script ran,
// or the attachment of a backend removed without our remove, because its
// script is no longer us (after `xenblkd takeover --undo` libxl runs the
// stock block's remove, which has nothing to free for a backend of ours).
func (d *Daemon) release(b hotplug.Backend, h holding) {
	key := keyOf(b)
	d.backends.set(key, backendState{})
	if !h.attached {
		return
	}
	if a, ok := d.model.Remove(key); ok {
		why := "released: backend gone without our remove"
		if h.state.presetup {
			why = "released: backend gone before the script ran"
		}
		d.decision(context.Background(), slog.LevelInfo, why,
			diskLine{b: b, target: a.Target.Path, dev: a.DevPath, diskseq: a.DiskSeq}, "users_left", a.Users)
	}
}

// labelsOf returns the labels s read, nil if it did not.
func labelsOf(s hotplug.Snapshot) *hotplug.Labels {
	if lb, ok := s.Labels(); ok {
		return &lb
	}
	return nil
}

func keyOf(b hotplug.Backend) model.Key { return model.Key{Domid: b.Domid, Devid: b.Devid} }

func backendOf(k model.Key) hotplug.Backend { return hotplug.Backend{Domid: k.Domid, Devid: k.Devid} }
