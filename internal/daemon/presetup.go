package daemon

// Pre-setup: libxl writes a disk's whole backend directory in one
// transaction, waits for xen-blkback to reach InitWait and only then execs
// the script (docs/how-it-works.md). The daemon
// watches its backend tree and does the add as soon as that transaction
// commits; blkback's watch on physical-device fires when it is registered
// (Linux's xenbus_watch_path fires once at registration), so a value written
// before blkback's probe is picked up. The exec'd add then
// only confirms what pre-setup attached; a refusal it decides afresh.
//
// Pre-setup's check of a backend is a lifecycle step (internal/lifecycle) like the
// exec'd add and remove, under the same backend lock, so an exec'd add racing
// a pre-setup never makes a second device: whichever runs second finds
// physical-device written, or the attachment pre-setup made.

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/lifecycle"
	"xenblkd/internal/model"
	"xenblkd/internal/xenstore"
)

// DefaultPresetupWorkers is how many backends are set up in parallel.
const DefaultPresetupWorkers = 4

// PresetupOptions configure StartPresetup.
type PresetupOptions struct {
	// Workers set up that many backends at a time. 0: DefaultPresetupWorkers.
	Workers int
}

// heldKeys returns the backends (all, or one domain's) with a record: those
// whose going away must be noticed.
func (d *Daemon) heldKeys(domid uint32, all bool) []model.Key { return d.backends.Keys(domid, all) }

// presetup watches hotplug.Tree and sets up new backends of ours.
type presetup struct {
	d   *Daemon
	log *slog.Logger

	mu      sync.Mutex
	cond    *sync.Cond         // signalled when queue or rescan changes, or on stop
	pending map[model.Key]bool // guarded by mu: keys in queue (events coalesce)
	queue   []model.Key        // guarded by mu: FIFO of keys to check
	rescan  bool               // guarded by mu: list the whole tree
	stopped bool               // guarded by mu
}

// StartPresetup watches the backend tree on xs and sets up each new backend
// of ours before libxl execs its script. The watch's initial event (also
// after a reconnect to XenStore) rescans the tree, so backends that appeared
// while the daemon was down or disconnected are picked up. stop ends it and
// waits for setups in flight.
func (d *Daemon) StartPresetup(ctx context.Context, xs *xenstore.Client, opts PresetupOptions) (stop func(), err error) {
	if opts.Workers <= 0 {
		opts.Workers = DefaultPresetupWorkers
	}
	p := &presetup{d: d, log: d.log.With("presetup", true), pending: map[model.Key]bool{}}
	p.cond = sync.NewCond(&p.mu)
	ctx, cancel := context.WithCancel(ctx)
	w, err := xs.Watch(ctx, hotplug.Tree, "xenblkd-presetup")
	if err != nil {
		cancel()
		return nil, fmt.Errorf("watch %s for pre-setup: %w", hotplug.Tree, err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { p.events(w) })
	for range opts.Workers {
		wg.Go(func() { p.work(ctx) })
	}
	p.log.Info("pre-setup: watching backends", "path", hotplug.Tree, "scripts", d.Scripts.String())
	return func() {
		cancel()
		w.Close(context.Background())
		p.mu.Lock()
		p.stopped = true
		p.cond.Broadcast()
		p.mu.Unlock()
		wg.Wait()
	}, nil
}

// events turns watch events into work. It only parses and queues, so it keeps
// up with a storm; a burst for one backend coalesces into one check.
func (p *presetup) events(w *xenstore.Watch) {
	for e := range w.Events() {
		switch ev := hotplug.ParseEvent(e.Path); ev.Level {
		case hotplug.LevelTree:
			p.requestRescan()
		case hotplug.LevelDomain:
			// The domain's directory changed (e.g. removed at destroy):
			// re-check what we remember of it.
			for _, k := range p.d.heldKeys(ev.Domid, false) {
				p.enqueue(k)
			}
		case hotplug.LevelBackend:
			k := keyOf(ev.Backend)
			if p.d.backends.Echo(k, ev.Node) {
				continue // our own write, or nothing check would act on
			}
			p.enqueue(k)
		}
	}
}

func (p *presetup) enqueue(k model.Key) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pending[k] {
		return
	}
	p.pending[k] = true
	p.queue = append(p.queue, k)
	p.cond.Signal()
}

func (p *presetup) requestRescan() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rescan = true
	p.cond.Signal()
}

// next waits for work: a rescan, or a key (taken off pending, so an event
// arriving during its check queues it again).
func (p *presetup) next() (key model.Key, rescan, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for !p.stopped && !p.rescan && len(p.queue) == 0 {
		p.cond.Wait()
	}
	switch {
	case p.stopped:
		return model.Key{}, false, false
	case p.rescan:
		p.rescan = false
		return model.Key{}, true, true
	}
	key = p.queue[0]
	p.queue = p.queue[1:]
	if len(p.queue) == 0 {
		p.queue = nil // let a storm's backing array go
	}
	delete(p.pending, key)
	return key, false, true
}

func (p *presetup) work(ctx context.Context) {
	for {
		key, rescan, ok := p.next()
		if !ok {
			return
		}
		if rescan {
			p.scan(ctx)
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, api.RequestTimeout)
		p.check(cctx, key)
		cancel()
	}
}

// scan queues every backend in the tree and every one we remember (to notice
// those that went away while the watch was down).
func (p *presetup) scan(ctx context.Context) {
	for _, k := range p.d.heldKeys(0, true) {
		p.enqueue(k)
	}
	bs, err := hotplug.ListBackends(ctx, p.d.store)
	if err != nil {
		p.log.Warn("pre-setup: list backends", "err", err)
		return
	}
	for _, b := range bs {
		p.enqueue(keyOf(b))
	}
	p.log.Info("pre-setup: rescanned backends", "backends", len(bs))
}

// check is pre-setup's lifecycle step for one backend: set it up if it is a
// new one of ours, or release what we hold for it if it is gone.
func (p *presetup) check(ctx context.Context, key model.Key) {
	p.d.step(ctx, backendOf(key), lifecycle.FromPresetup)
}
