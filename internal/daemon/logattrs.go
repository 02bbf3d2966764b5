package daemon

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"xenblkd/internal/hotplug"
	"xenblkd/internal/model"
	"xenblkd/internal/xenstore"
)

// Every line about a decision on one disk (attached, released, refused,
// recovered) carries the same attributes, in this order and format:
//
//	domain=<name> domid=<n> devid=<n> vdev=<xvda> target=<params> dev=<device> diskseq=<decimal>
//
// domain and vdev come from the label cache ("" when absent or unreadable,
// e.g. a driver domain may not read other domains' names); dev is "" and
// diskseq 0 when there is none (a refusal, a block device has no diskseq
// from us).
type diskLine struct {
	b       hotplug.Backend
	target  string
	dev     string
	diskseq uint64
}

// attrs returns the line's attributes.
func (d *Daemon) attrs(l diskLine) []any {
	lb := d.labels.get(l.b)
	return []any{"domain", lb.Domain, "domid", l.b.Domid, "devid", l.b.Devid, "vdev", lb.Vdev, "target", l.target, "dev", l.dev, "diskseq", l.diskseq}
}

// logDisk logs one line about a decision on a disk, at level.
func (d *Daemon) logDisk(ctx context.Context, level slog.Level, msg string, l diskLine, extra ...any) {
	if !d.log.Enabled(ctx, level) {
		return
	}
	d.log.Log(ctx, level, msg, append(d.attrs(l), extra...)...)
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

// labelReadTimeout bounds the read of a line's labels that no step made.
const labelReadTimeout = 500 * time.Millisecond

// labelOps returns the reads of b's labels for a step to send in its own
// batch, if a line about b may be logged and they are not cached.
func (d *Daemon) labelOps(b hotplug.Backend) []xenstore.Op {
	if !d.log.Enabled(context.Background(), slog.LevelWarn) || d.labels.has(keyOf(b)) {
		return nil
	}
	return hotplug.LabelOps(b)
}

// labelCache keeps the labels (the domain's name, the backend's vdev) of
// the backends a log line may name. A step that reads XenStore anyway sends
// their reads in its own batch (labelOps; no round trip of their own, and
// nothing in the XenStore contract knows of them) and fills the cache with
// the replies; a backend's entry stays while it is attached (the step drops
// it otherwise), so the lines of a disk's attach and release cost one read
// of them between them, and the remove reads nothing.
type labelCache struct {
	store hotplug.Store
	mu    sync.Mutex
	m     map[model.Key]hotplug.Labels // guarded by mu
}

func (c *labelCache) has(key model.Key) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.m[key]
	return ok
}

// fill records the replies to labelOps' reads, if there were any.
func (c *labelCache) fill(key model.Key, replies []xenstore.Reply) {
	if len(replies) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[model.Key]hotplug.Labels{}
	}
	c.m[key] = hotplug.ParseLabels(replies)
}

// get returns b's labels: cached, or read now (a line no step read them
// for: a refusal by pre-setup, logged at debug).
func (c *labelCache) get(b hotplug.Backend) hotplug.Labels {
	c.mu.Lock()
	lb, ok := c.m[keyOf(b)]
	c.mu.Unlock()
	if ok {
		return lb
	}
	ctx, cancel := context.WithTimeout(context.Background(), labelReadTimeout)
	defer cancel()
	return hotplug.ReadLabels(ctx, c.store, b)[0]
}

// drop forgets key's labels.
func (c *labelCache) drop(key model.Key) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, key)
}
