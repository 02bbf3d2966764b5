package daemon

import (
	"context"
	"log/slog"
	"time"

	"xenblkd/internal/hotplug"
)

// Every line about a decision on one disk (attached, released, refused,
// recovered) carries the same attributes, in this order and format:
//
//	domain=<name> domid=<n> devid=<n> vdev=<xvda> target=<params> dev=<device> diskseq=<decimal>
//
// domain and vdev are read from XenStore ("" when absent or unreadable, e.g.
// a driver domain may not read other domains' names or a removed backend is
// gone); dev is "" and diskseq 0 when there is none (a refusal, a block
// device has no diskseq from us).
type diskLine struct {
	b       hotplug.Backend
	labels  *hotplug.Labels // read with the step's other requests; nil: read for the line
	target  string
	dev     string
	diskseq uint64
}

// nameReadTimeout bounds the informational reads of a decision line.
const nameReadTimeout = 500 * time.Millisecond

// attrs returns the line's attributes (the labels, unless read already: one batch).
func (d *Daemon) attrs(ctx context.Context, l diskLine) []any {
	lb := l.labels
	if lb == nil {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), nameReadTimeout)
		defer cancel()
		lb = &hotplug.ReadLabels(ctx, d.store, l.b)[0]
	}
	return []any{"domain", lb.Domain, "domid", l.b.Domid, "devid", l.b.Devid, "vdev", lb.Vdev, "target", l.target, "dev", l.dev, "diskseq", l.diskseq}
}

// logDisk logs one line about a decision on a disk, at level.
func (d *Daemon) logDisk(ctx context.Context, level slog.Level, msg string, l diskLine, extra ...any) {
	if !d.log.Enabled(ctx, level) {
		return
	}
	d.log.Log(ctx, level, msg, append(d.attrs(ctx, l), extra...)...)
}

// logRefusal logs a failed add once, where params (l.target) is known, as
// classify says. Pre-setup's refusals are at debug: the exec'd add decides
// again, and reports what it finds then.
func (d *Daemon) logRefusal(ctx context.Context, l diskLine, by string, err error) {
	c := classify(err)
	if by == byPresetup && !c.transient {
		c.level, c.msg = slog.LevelDebug, "pre-setup refused; the script's add decides again"
	}
	d.logDisk(ctx, c.level, c.msg, l, "reason", c.reason, "by", by, "err", err)
}
