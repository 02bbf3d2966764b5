package daemon

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"xenblkd/internal/hotplug"
	"xenblkd/internal/model"
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

// labelReadTimeout bounds the informational reads of a decision line.
const labelReadTimeout = 500 * time.Millisecond

// loadLabels starts reading b's labels if a line about it may be logged.
func (d *Daemon) loadLabels(b hotplug.Backend) {
	if d.log.Enabled(context.Background(), slog.LevelWarn) {
		d.labels.load(b)
	}
}

// labelCache keeps the labels (the domain's name, the backend's vdev) of the
// backends a log line may name, so that the lines of a disk's attach and of
// its release cost one read between them, and no XenStore protocol call
// carries them. A read starts (load) when a step about to log begins its own
// XenStore work, on a goroutine of its own: it goes out beside the step's
// requests (no round trip of its own), and no backend lock is held across
// it. A line waits for it, at most labelReadTimeout; a backend's entry goes
// when nothing of it is attached any more (drop).
type labelCache struct {
	store hotplug.Store
	mu    sync.Mutex
	m     map[model.Key]*labelRead // guarded by mu
}

// labelRead is one read of a backend's labels: lb is set before done closes.
type labelRead struct {
	done chan struct{}
	lb   hotplug.Labels
}

// load starts reading b's labels unless they are cached or being read.
func (c *labelCache) load(b hotplug.Backend) *labelRead {
	key := keyOf(b)
	c.mu.Lock()
	defer c.mu.Unlock()
	if r := c.m[key]; r != nil {
		return r
	}
	r := &labelRead{done: make(chan struct{})}
	if c.m == nil {
		c.m = map[model.Key]*labelRead{}
	}
	c.m[key] = r
	go func() {
		defer close(r.done)
		ctx, cancel := context.WithTimeout(context.Background(), labelReadTimeout)
		defer cancel()
		r.lb = hotplug.ReadLabels(ctx, c.store, b)[0]
	}()
	return r
}

// get returns b's labels, read now if load was not called ("" if the read
// takes longer than labelReadTimeout).
func (c *labelCache) get(b hotplug.Backend) hotplug.Labels {
	r := c.load(b)
	t := time.NewTimer(labelReadTimeout)
	defer t.Stop()
	select {
	case <-r.done:
		return r.lb
	case <-t.C:
		return hotplug.Labels{}
	}
}

// drop forgets key's labels.
func (c *labelCache) drop(key model.Key) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, key)
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
