package daemon

import (
	"context"
	"log/slog"
	"time"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/lifecycle"
	"xenblkd/internal/model"
	"xenblkd/internal/text"
	"xenblkd/internal/xenstore"
)

// step runs one lifecycle step of backend b for origin o
// (internal/lifecycle): snapshot, decide, act, all under the backend's lock,
// then the backend's next record.
func (d *Daemon) step(ctx context.Context, b hotplug.Backend, o lifecycle.Origin) (*api.Attachment, error) {
	start := time.Now()
	key := keyOf(b)
	unlock := d.backends.Lock(key)
	defer unlock()
	rec := d.backends.Get(key)
	f := lifecycle.Facts{Snap: hotplug.Snapshot{Backend: b}}
	if nodes := lifecycle.NodesFor(o, rec); nodes != 0 {
		var also []xenstore.Op
		if o == lifecycle.FromAdd || o == lifecycle.FromRecovery {
			also = d.labelOps(b) // for its line, in the same batch
		}
		f.Snap = hotplug.ReadSnapshot(ctx, d.store, b, nodes, also...)
		d.labels.fill(key, f.Snap.Also)
		f.Ours = f.Snap.Has(hotplug.Script) && d.Scripts.Ours(f.Snap.Value(hotplug.Script))
	}
	dec := lifecycle.Decide(o, f, rec)
	switch {
	case dec.Do == lifecycle.Confirm: // act logs it, with more
	case dec.Do != lifecycle.Nothing || o != lifecycle.FromPresetup: // pre-setup's "nothing" is most events
		d.log.Debug("lifecycle", "domid", b.Domid, "devid", b.Devid, "origin", o.String(), "phase", rec.Phase.String(),
			"action", dec.Do.String(), "why", dec.Why)
	}
	if o == lifecycle.FromRemove {
		// Put first, so that pre-setup's watch skips the events of the
		// removal's own writes (Table.Echo).
		d.backends.Put(key, dec.Next)
	}
	if dec.Writes(o) {
		// Ends after the next record is put: no gap for our own events.
		defer d.backends.StartWriting(key)()
	}
	out := d.act(ctx, o, f, rec, dec)
	next := lifecycle.Settle(o, rec, dec, out)
	if !next.Attached {
		d.labels.drop(key) // its lines are logged
	}
	if !d.backends.Put(key, next) && next.Phase == lifecycle.Refused {
		d.log.Warn("pre-setup: too many failures remembered; the script's add will retry", "domid", key.Domid, "devid", key.Devid)
	}
	if o == lifecycle.FromPresetup && dec.Do == lifecycle.Attach {
		d.presetupDone(key, out, start)
	}
	var a *api.Attachment
	if out.Attachment != nil && o != lifecycle.FromRecovery {
		a = toAPI(*out.Attachment)
	}
	return a, out.Err
}

// act carries out dec; its outcome is what Settle needs.
func (d *Daemon) act(ctx context.Context, o lifecycle.Origin, f lifecycle.Facts, rec lifecycle.Record, dec lifecycle.Decision) lifecycle.Outcome {
	b := f.Snap.Backend
	switch dec.Do {
	case lifecycle.Attach:
		if rec.Attached {
			// Made for a directory that was removed and written again
			// since (Decide): not this one's.
			d.release(b, rec)
		}
		a, err := d.attach(ctx, f.Snap, o)
		if err != nil {
			return lifecycle.Outcome{Err: err, Transient: classify(err).transient}
		}
		return lifecycle.Outcome{Attachment: &a}
	case lifecycle.Confirm:
		a := rec.Attachment
		d.log.Debug("add: confirmed", "domid", b.Domid, "devid", b.Devid, "dev", a.DevPath, "diskseq", a.DiskSeq, "why", dec.Why)
		return lifecycle.Outcome{Attachment: &a}
	case lifecycle.Refuse:
		return lifecycle.Outcome{Err: d.refuseRequest(ctx, f.Snap, o, dec.Err)}
	case lifecycle.ReleaseStock:
		if err := d.releaseStock(f.Snap); err != nil { // stock.go
			d.log.Error("remove: the stock script's loop device does not check out; not freeing it",
				"domid", b.Domid, "devid", b.Devid, "err", err)
		}
		d.detach(ctx, b)
	case lifecycle.Detach:
		d.detach(ctx, b)
	case lifecycle.Release:
		d.release(b, rec)
	case lifecycle.Restore, lifecycle.AdoptStock:
		err := d.restore(ctx, f.Snap, dec.Do == lifecycle.AdoptStock, d.run) // recovery.go
		if a, ok := d.model.Lookup(keyOf(b)); ok && err == nil {
			return lifecycle.Outcome{Attachment: &a}
		}
		return lifecycle.Outcome{Err: err}
	}
	return lifecycle.Outcome{}
}

// refuseRequest reports a request that cannot be acted on (the action Refuse).
func (d *Daemon) refuseRequest(ctx context.Context, s hotplug.Snapshot, o lifecycle.Origin, err error) error {
	if o == lifecycle.FromRecovery {
		return err // Recover logs it per backend
	}
	err = withReason(ReasonBadParams, err)
	d.logRefusal(ctx, diskLine{b: s.Backend}, byOrigin(o), err)
	return err
}

// presetupDone counts and logs what pre-setup's attach came to.
func (d *Daemon) presetupDone(key model.Key, out lifecycle.Outcome, start time.Time) {
	switch {
	case out.Attachment != nil:
		d.metrics.presetupAttached(start)
		d.log.Debug("pre-setup: attached before the script ran", "domid", key.Domid, "devid", key.Devid,
			"dev", out.Attachment.DevPath, "diskseq", out.Attachment.DiskSeq)
	case out.Transient:
		d.log.Warn("pre-setup failed; the script's add will retry", "domid", key.Domid, "devid", key.Devid, "err", out.Err)
	}
}

// Who made an add's decision, for its log line (by=).
const (
	byScript   = "script"   // the hotplug entry libxl exec'd
	byPresetup = "presetup" // pre-setup, before libxl exec'd the script
)

func byOrigin(o lifecycle.Origin) string {
	if o == lifecycle.FromPresetup {
		return byPresetup
	}
	return byScript
}

// attach opens params, attaches it in the model and writes physical-device.
func (d *Daemon) attach(ctx context.Context, s hotplug.Snapshot, o lifecycle.Origin) (model.Attachment, error) {
	start := time.Now()
	b, by := s.Backend, byOrigin(o)
	req, err := s.Request() // checked by decide
	if err != nil {
		return model.Attachment{}, d.refuseRequest(ctx, s, o, err)
	}
	line := diskLine{b: b, target: text.Truncate(req.Params, 200)}
	fail := func(err error) (model.Attachment, error) {
		d.logRefusal(ctx, line, by, err)
		return model.Attachment{}, err
	}
	mode, err := model.ParseMode(req.Mode)
	if err != nil {
		return fail(withReason(ReasonBadParams, err))
	}
	backing, target, err := openTarget(req.Params, mode.Writable)
	if err != nil {
		return fail(withReason(ReasonBadParams, err))
	}
	defer backing.Close() // the loop device keeps its own reference
	key := keyOf(b)
	a, err := d.model.Add(ctx, model.AddRequest{Key: key, Params: req.Params, Mode: mode, Target: target,
		Backing: backing, Domains: d.domain})
	if err != nil {
		return fail(err)
	}
	res := hotplug.Result{Request: req, Rdev: a.Rdev, DevPath: a.DevPath, DiskSeq: a.DiskSeq, ClearError: s.Has(hotplug.HotplugError)}
	also, err := hotplug.Connect(ctx, d.store, b, res, d.labelOps(b)...) // the line's labels, unless cached
	d.labels.fill(key, also)
	if err != nil {
		d.model.Remove(key)
		return fail(withReason(ReasonXenStore, err))
	}
	d.metrics.attached(a)
	line.target, line.dev, line.diskseq = target.Path, a.DevPath, a.DiskSeq
	d.logDisk(ctx, slog.LevelInfo, "attached", line,
		"mode", mode, "kind", target.Kind.String(), "io", a.IO.String(), "users", a.Users, "by", by, "took", time.Since(start))
	return a, nil
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
	if err := hotplug.Disconnect(ctx, d.store, b); err != nil {
		d.log.Warn("remove: could not clear physical-device", "domid", b.Domid, "devid", b.Devid, "err", err)
		d.metrics.countError(api.OpRemove, withReason(ReasonXenStore, err))
	}
	a, found := d.model.Remove(keyOf(b))
	if !found {
		d.log.Info("remove: not attached here, nothing to release", "domid", b.Domid, "devid", b.Devid)
		return
	}
	d.logDisk(ctx, slog.LevelInfo, "released", diskLine{b: b, target: a.Target.Path, dev: a.DevPath, diskseq: a.DiskSeq},
		"users_left", a.Users)
}

// release forgets a backend whose directory is gone, and drops what we hold
// for it: what pre-setup made for a backend removed before its script ran,
// or the attachment of a backend removed without our remove, because its
// script is no longer us (after `xenblkd takeover --undo` libxl runs the
// stock block's remove, which has nothing to free for a backend of ours).
func (d *Daemon) release(b hotplug.Backend, r lifecycle.Record) {
	key := keyOf(b)
	if !r.Attached {
		return
	}
	if a, ok := d.model.Remove(key); ok {
		why := "released: backend gone without our remove"
		if r.Phase == lifecycle.PresetUp {
			why = "released: backend gone before the script ran"
		}
		d.logDisk(context.Background(), slog.LevelInfo, why,
			diskLine{b: b, target: a.Target.Path, dev: a.DevPath, diskseq: a.DiskSeq}, "users_left", a.Users)
	}
}

func keyOf(b hotplug.Backend) model.Key { return model.Key{Domid: b.Domid, Devid: b.Devid} }

func backendOf(k model.Key) hotplug.Backend { return hotplug.Backend{Domid: k.Domid, Devid: k.Devid} }
