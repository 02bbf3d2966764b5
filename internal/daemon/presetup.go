package daemon

// Pre-setup: libxl writes a disk's whole backend directory in one
// transaction, waits for xen-blkback to reach InitWait and only then execs
// the script (docs/how-it-works.md). The daemon
// watches its backend tree and does the add as soon as that transaction
// commits; blkback's watch on physical-device fires at registration, so a
// value written before its probe is picked up (§4.2). The exec'd add then
// only confirms, or reports the failure pre-setup found.
//
// Every add, remove and pre-setup of one backend runs under that backend's
// lock (backendTable), so an exec'd add racing a pre-setup never makes a
// second device: whichever runs second finds physical-device written.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/model"
	"xenblkd/internal/xenstore"
)

// DefaultPresetupWorkers is how many backends are set up in parallel.
const DefaultPresetupWorkers = 4

// maxRemembered bounds the backends whose failure or finished script is
// remembered. Past it nothing more is: a failure is then found again by the
// exec'd add, which runs the whole add itself.
const maxRemembered = 16384

// backendTree is watched relative to the daemon's own domain, so the same
// code serves dom0 and a driver domain.
const backendTree = "backend/vbd"

// PresetupOptions configure StartPresetup.
type PresetupOptions struct {
	// Workers set up that many backends at a time. 0: DefaultPresetupWorkers.
	Workers int
}

// backendTable holds a lock and the pre-setup state of each backend.
type backendTable struct {
	mu         sync.Mutex
	locks      map[model.Key]*backendLock  // guarded by mu; dropped when unused
	state      map[model.Key]*backendState // guarded by mu; only backends with something to remember
	remembered int                         // guarded by mu: states that are not presetup (bounded)
	writing    map[model.Key]bool          // guarded by mu: an add holding the backend's lock may write its nodes
}

type backendLock struct {
	mu   sync.Mutex
	refs int // guarded by backendTable.mu
}

// backendState is what is known of one backend beyond the model. An entry
// lives until the backend's directory is seen gone (or the script's remove).
type backendState struct {
	presetup  bool             // attached by pre-setup; the exec'd add has not confirmed it yet
	failure   *presetupFailure // pre-setup refused it
	scriptRan bool             // the exec'd add or remove has run: pre-setup leaves it alone
}

// presetupFailure is a refusal, with the request it was for: a backend
// re-created with other params or mode is not the one that failed.
type presetupFailure struct {
	params, mode string
	err          error
}

// lock serialises add, remove and pre-setup of one backend.
func (t *backendTable) lock(key model.Key) (unlock func()) {
	t.mu.Lock()
	if t.locks == nil {
		t.locks = map[model.Key]*backendLock{}
	}
	l := t.locks[key]
	if l == nil {
		l = &backendLock{}
		t.locks[key] = l
	}
	l.refs++
	t.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		t.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(t.locks, key)
		}
		t.mu.Unlock()
	}
}

// get returns a copy of key's state (zero if none).
func (t *backendTable) get(key model.Key) backendState {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s := t.state[key]; s != nil {
		return *s
	}
	return backendState{}
}

// set records key's state; a zero state forgets the key. Only a presetup
// state is always kept (it is bounded by the model's attachments); others are
// dropped past maxRemembered, and set then reports false.
func (t *backendTable) set(key model.Key, s backendState) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if old := t.state[key]; old != nil {
		if !old.presetup {
			t.remembered--
		}
		delete(t.state, key)
	}
	if s == (backendState{}) {
		return true
	}
	if !s.presetup {
		if t.remembered >= maxRemembered {
			return false
		}
		t.remembered++
	}
	if t.state == nil {
		t.state = map[model.Key]*backendState{}
	}
	t.state[key] = &s
	return true
}

// ownNodes are the nodes an add writes below a backend (hotplug.Connect).
var ownNodes = map[string]bool{"physical-device": true, "physical-device-path": true, "diskseq": true, "hotplug-status": true}

// startWriting marks key as written to by an add of ours until end is called,
// so that the watch events of its own writes are not checked (see echo).
func (t *backendTable) startWriting(key model.Key) (end func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.writing == nil {
		t.writing = map[model.Key]bool{}
	}
	t.writing[key] = true
	return func() {
		t.mu.Lock()
		delete(t.writing, key)
		t.mu.Unlock()
	}
}

// echo reports whether a watch event for node (the first name below key's
// backend directory; "" for the directory itself) cannot change what check
// does, so it need not be checked: while an add of ours writes the backend,
// the nodes it writes; once pre-setup attached the backend or its script ran,
// anything but the directory and the nodes libxl writes to (re)create it, as
// check then only looks for the backend being gone.
func (t *backendTable) echo(key model.Key, node string) bool {
	switch node {
	case "", "script", "params", "mode", "state":
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.writing[key] && ownNodes[node] {
		return true
	}
	s := t.state[key]
	return s != nil && s.failure == nil && (s.presetup || s.scriptRan)
}

// keys returns the backends with a state (all, or one domain's).
func (t *backendTable) keys(domid uint32, all bool) []model.Key {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []model.Key
	for k := range t.state {
		if all || k.Domid == domid {
			out = append(out, k)
		}
	}
	return out
}

// heldKeys returns the backends (all, or one domain's) that pre-setup
// remembers or the model holds: those whose going away must be noticed.
func (d *Daemon) heldKeys(domid uint32, all bool) []model.Key {
	keys := d.backends.keys(domid, all)
	for _, a := range d.model.List() {
		if all || a.Key.Domid == domid {
			keys = append(keys, a.Key) // enqueue drops duplicates
		}
	}
	return keys
}

func keyOf(b hotplug.Backend) model.Key { return model.Key{Domid: b.Domid, Devid: b.Devid} }

// hotplugAdd is the exec'd add: it confirms a pre-setup attachment, reports
// a pre-setup failure, or does the whole add.
func (d *Daemon) hotplugAdd(ctx context.Context, b hotplug.Backend) (*api.Attachment, error) {
	key := keyOf(b)
	unlock := d.backends.lock(key)
	defer unlock()
	st := d.backends.get(key)
	defer d.backends.startWriting(key)() // ends after scriptRan is set: no gap for our own events
	defer d.backends.set(key, backendState{scriptRan: true})
	if st.presetup {
		// Answered from what the daemon knows, without a XenStore read:
		// pre-setup wrote this backend's nodes under this same lock, and its
		// watch releases the attachment (and forgets this state) as soon as
		// the backend directory goes, so a backend that is still presetup
		// here still holds what pre-setup wrote.
		if a, ok := d.model.Lookup(key); ok {
			d.log.Debug("add: confirmed pre-setup", "domid", b.Domid, "devid", b.Devid, "dev", a.DevPath, "diskseq", a.DiskSeq)
			return toAPI(a), nil
		}
	}
	if f := st.failure; f != nil {
		req, err := hotplug.ReadRequest(ctx, d.store, b)
		if err != nil {
			err = withReason(ReasonBadParams, err)
			d.refused(ctx, b, "", byScript, err)
			return nil, err
		}
		if req.Params == f.params && req.Mode == f.mode && req.PhysicalDevice == "" {
			// Logged when pre-setup refused it.
			d.log.Debug("add refused (found by pre-setup)", "domid", b.Domid, "devid", b.Devid, "err", f.err)
			return nil, f.err
		}
	}
	return d.add(ctx, b, byScript)
}

// hotplugRemove is the exec'd remove.
func (d *Daemon) hotplugRemove(ctx context.Context, b hotplug.Backend) {
	key := keyOf(b)
	unlock := d.backends.lock(key)
	defer unlock()
	// Remembered so that pre-setup does not attach it again while the
	// backend directory lingers without physical-device.
	d.backends.set(key, backendState{scriptRan: true})
	d.remove(ctx, b)
}

// presetup watches backendTree and sets up new backends of ours.
type presetup struct {
	d   *Daemon
	xs  *xenstore.Client
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
	p := &presetup{d: d, xs: xs, log: d.log.With("presetup", true), pending: map[model.Key]bool{}}
	p.cond = sync.NewCond(&p.mu)
	ctx, cancel := context.WithCancel(ctx)
	w, err := xs.Watch(ctx, backendTree, "xenblkd-presetup")
	if err != nil {
		cancel()
		return nil, fmt.Errorf("watch %s for pre-setup: %w", backendTree, err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { p.events(w) })
	for range opts.Workers {
		wg.Go(func() { p.work(ctx) })
	}
	p.log.Info("pre-setup: watching backends", "path", backendTree, "scripts", d.Scripts.String())
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
	for ev := range w.Events() {
		switch k, domid, level := parseEventPath(ev.Path); level {
		case levelTree:
			p.requestRescan()
		case levelDomain:
			// The domain's directory changed (e.g. removed at destroy):
			// re-check what we remember of it.
			for _, k := range p.d.heldKeys(domid, false) {
				p.enqueue(k)
			}
		case levelBackend:
			if p.d.backends.echo(k, backendNode(ev.Path)) {
				continue // our own write, or nothing check would act on
			}
			p.enqueue(k)
		}
	}
}

type eventLevel int

const (
	levelNone    eventLevel = iota // not ours to look at
	levelTree                      // backend/vbd itself
	levelDomain                    // backend/vbd/<domid>
	levelBackend                   // backend/vbd/<domid>/<devid>[/...]
)

// parseEventPath classifies a watch event's path (relative, as registered;
// an absolute /local/domain/<id>/backend/vbd/... is accepted too).
func parseEventPath(p string) (key model.Key, domid uint32, level eventLevel) {
	if strings.HasPrefix(p, "/") {
		i := strings.Index(p, "/"+backendTree)
		if i < 0 {
			return model.Key{}, 0, levelNone
		}
		p = p[i+1:]
	}
	rest, ok := strings.CutPrefix(p, backendTree)
	if !ok || (rest != "" && rest[0] != '/') {
		return model.Key{}, 0, levelNone
	}
	parts := strings.SplitN(strings.TrimPrefix(rest, "/"), "/", 3)
	switch {
	case rest == "":
		return model.Key{}, 0, levelTree
	case len(parts) == 1:
		n, err := strconv.ParseUint(parts[0], 10, 32)
		if err != nil {
			return model.Key{}, 0, levelNone
		}
		return model.Key{}, uint32(n), levelDomain
	}
	b, err := hotplug.ParseBackendPath(backendTree + "/" + parts[0] + "/" + parts[1])
	if err != nil {
		return model.Key{}, 0, levelNone
	}
	return keyOf(b), b.Domid, levelBackend
}

// backendNode returns the first name below the backend directory in a
// levelBackend event path, "" for the directory itself.
func backendNode(p string) string {
	_, rest, _ := strings.Cut(p, backendTree+"/")
	parts := strings.SplitN(rest, "/", 4) // domid, devid, node, below
	if len(parts) < 3 {
		return ""
	}
	return parts[2]
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
		cctx, cancel := context.WithTimeout(ctx, RequestTimeout)
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
	domains, err := p.xs.Directory(ctx, backendTree)
	if err != nil {
		if !errors.Is(err, unix.ENOENT) {
			p.log.Warn("pre-setup: list backends", "path", backendTree, "err", err)
		}
		return
	}
	n := 0
	for _, dom := range domains {
		devs, err := p.xs.Directory(ctx, backendTree+"/"+dom)
		if err != nil {
			continue // removed meanwhile
		}
		for _, dev := range devs {
			if b, err := hotplug.ParseBackendPath(backendTree + "/" + dom + "/" + dev); err == nil {
				p.enqueue(keyOf(b))
				n++
			}
		}
	}
	p.log.Info("pre-setup: rescanned backends", "backends", n)
}

// check looks at one backend: set it up if it is a new one of ours, or
// release what pre-setup made for it if it is gone.
func (p *presetup) check(ctx context.Context, key model.Key) {
	d := p.d
	b := hotplug.Backend{Domid: key.Domid, Devid: key.Devid}
	unlock := d.backends.lock(key)
	defer unlock()
	st := d.backends.get(key)
	_, held := d.model.Lookup(key)
	if st.scriptRan {
		if p.gone(ctx, b) {
			p.release(key, st, held)
		}
		return
	}

	// The nodes that decide, read in parallel (the client pipelines them).
	start := time.Now()
	names := [...]string{"script", "state", "physical-device", "params", "mode", "hotplug-error"}
	var vals [len(names)]string
	var errs [len(names)]error
	var wg sync.WaitGroup
	for i, n := range names {
		wg.Go(func() { vals[i], errs[i] = d.store.Read(ctx, b.Path()+"/"+n) })
	}
	wg.Wait()
	script, state, params, mode := vals[0], vals[1], vals[3], vals[4]
	for i, err := range errs {
		if err != nil && !errors.Is(err, unix.ENOENT) {
			p.log.Debug("pre-setup: read", "domid", key.Domid, "devid", key.Devid, "node", names[i], "err", err)
			return // XenStore trouble: the exec'd add does the work
		}
	}
	if errors.Is(errs[0], unix.ENOENT) {
		if (st != (backendState{}) || held) && p.gone(ctx, b) {
			p.release(key, st, held)
		}
		return // gone, or libxl's nodes not written yet
	}
	if !d.Scripts.Ours(script) {
		return // another script's backend: never touched
	}
	if errs[2] == nil || st.presetup {
		return // physical-device is set (never rewritten)
	}
	if errs[5] == nil {
		// An error is recorded (e.g. recovery found the device it named gone):
		// the backend is failing; only the exec'd add may try again.
		return
	}
	if errs[1] != nil || (state != "1" && state != "2") {
		return // past InitWait: the script has run, or blkback gave up
	}
	if f := st.failure; f != nil {
		if f.params == params && f.mode == mode {
			return // tried and refused already
		}
		d.backends.set(key, backendState{}) // a new backend under the same name
	}

	log := p.log.With("domid", key.Domid, "devid", key.Devid)
	defer d.backends.startWriting(key)() // ends after the state below is set
	a, err := d.add(ctx, b, byPresetup)
	switch {
	case err == nil && a != nil:
		d.metrics.presetupAttached(start)
		d.backends.set(key, backendState{presetup: true})
		log.Debug("pre-setup: attached before the script ran", "dev", a.Device, "diskseq", a.DiskSeq)
	case err == nil:
		// physical-device appeared meanwhile: nothing of ours to remember.
	case transient(err):
		log.Warn("pre-setup failed; the script's add will retry", "err", err)
	default:
		if !d.backends.set(key, backendState{failure: &presetupFailure{params: params, mode: mode, err: err}}) {
			log.Warn("pre-setup: too many failures remembered; the script's add will retry")
		}
		// hotplug-error is left to the exec'd add: libxl reads it only after
		// the script failed, and the backend may still go away unused.
		// d.add logged the refusal.
		log.Debug("pre-setup refused; the script's add will report it", "err", err)
	}
}

// gone reports whether b's directory no longer exists.
func (p *presetup) gone(ctx context.Context, b hotplug.Backend) bool {
	_, err := p.d.store.Read(ctx, b.Path())
	return errors.Is(err, unix.ENOENT)
}

// release forgets a backend whose directory is gone, and drops what we hold
// for it: what pre-setup made for a backend removed before its script ran,
// or the attachment of a backend removed without our remove, because its
// script is no longer us (after `xenblkd takeover --undo` libxl runs the
// stock block's remove, which has nothing to free for a backend of ours).
func (p *presetup) release(key model.Key, st backendState, held bool) {
	p.d.backends.set(key, backendState{})
	if !held {
		return
	}
	if a, ok := p.d.model.Remove(key); ok {
		why := "released: backend gone without our remove"
		if st.presetup {
			why = "released: backend gone before the script ran"
		}
		p.d.decision(context.Background(), slog.LevelInfo, why,
			diskLine{b: hotplug.Backend{Domid: key.Domid, Devid: key.Devid}, target: a.Target.Path, dev: a.DevPath, diskseq: a.DiskSeq},
			"users_left", a.Users)
	}
}

// transient errors are worth a retry by the exec'd add rather than being
// reported from memory: XenStore unreachable, the daemon stopping, or the
// backend vanishing under the write.
func transient(err error) bool {
	return errors.Is(err, xenstore.ErrConnectionLost) || errors.Is(err, xenstore.ErrClosed) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, hotplug.ErrBackendGone) || errors.Is(err, unix.EAGAIN)
}
