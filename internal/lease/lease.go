// Package lease is cluster mode's policy: which targets are shared between
// hosts, the stable name of each one's sanlock resource lease, and holding
// those leases while attachments use them (model.Leases). A read-write
// attachment holds its target's lease exclusively, read-only ones share it;
// the lease goes when the host's last attachment of the target goes.
//
// The leases are persistent: if the daemon exits or crashes, sanlock keeps
// them as orphans of this host, and the next daemon adopts them (every
// acquire asks for the orphan first) and releases those no attachment needs
// (ReleaseOrphans). A dead host's leases expire on sanlock's timeouts.
//
// Each lease lives in a file of its own in the lease directory on shared
// storage, <dir>/<name>.lease, initialised by whichever host needs it first.
// Beside it, each holder writes a note, <dir>/<name>.host<ID>, naming its
// host, VM and domain: sanlock records only host ids, and the note is what a
// refusal names and what live migration matches VMs by.
package lease

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"xenblkd/internal/keyed"
	"xenblkd/internal/model"
	"xenblkd/internal/sanlock"
)

// Config is cluster mode's configuration.
type Config struct {
	Lockspace sanlock.Lockspace // name, this host's id, the lockspace's disk
	Dir       string            // where the lease files live: shared storage every host sees
	Shares    []Share           // directories whose files are shared targets
	Devices   []string          // glob patterns of block device paths that are shared targets
	HostName  string            // this host's name in notes and messages (default: os.Hostname)
	Handover  time.Duration     // how long a migration's hand-over may take before it is reported
	Sysfs     string            // sysfs root, for tests ("" is /sys)
}

// Manager holds this host's leases. It implements model.Leases.
type Manager struct {
	cfg    Config
	client sanlock.Client
	log    *slog.Logger
	locks  keyed.Mutex[string] // by lease name: one acquire/release of a lease at a time

	regMu  sync.Mutex         // one registration at a time (held across it; taken before mu, never under it)
	mu     sync.Mutex         // leaf: guards proc and held, never held across a sanlock request
	proc   *sanlock.Process   // the registered connection, made on first use
	held   map[string]*holder // guarded by mu: by lease name
	events Events             // counters for metrics; guarded by mu
	closed chan struct{}      // closed by Close: hand-overs stop
}

// Events counts what the manager did, for metrics.
type Events struct {
	Acquired, Refused, HandedOver, HandoverOverdue uint64
}

// holder is one lease this host holds (or, pending a hand-over, waits for).
type holder struct {
	res      sanlock.Resource
	identity string
	target   string             // the target's path, for messages
	users    map[model.Key]bool // backends using it: true if writable
	shared   bool               // held in shared mode
	pending  bool               // a migration's destination: used before the source let go
	since    time.Time          // when acquired, or when the hand-over started
	vm       string             // the VM of the backends, for notes
	done     chan struct{}      // closed when the lease goes (stops a hand-over)
}

// Lease is one held lease, for status and metrics.
type Lease struct {
	Name     string
	Identity string
	Target   string
	Mode     string // "exclusive", "shared", "pending" (hand-over not complete)
	Users    int
	Since    time.Time
}

// New returns a manager talking to the sanlock daemon through client.
func New(cfg Config, client sanlock.Client, log *slog.Logger) *Manager {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.HostName == "" {
		cfg.HostName, _ = os.Hostname()
	}
	if cfg.Handover == 0 {
		cfg.Handover = 30 * time.Second
	}
	if cfg.Dir == "" {
		cfg.Dir = filepath.Dir(cfg.Lockspace.Disk.Path)
	}
	return &Manager{cfg: cfg, client: client, log: log, held: map[string]*holder{}, closed: make(chan struct{})}
}

// Config returns the manager's configuration, defaults filled in.
func (m *Manager) Config() Config { return m.cfg }

// SanlockDir is the sanlock daemon's run directory the manager talks to.
func (m *Manager) SanlockDir() string {
	if m.client.Dir == "" {
		return sanlock.DefaultDir
	}
	return m.client.Dir
}

// Join joins the lockspace unless this host already is in it (sanlock keeps
// lockspaces across restarts of xenblkd). Joining takes 2*io_timeout or more.
func (m *Manager) Join(ctx context.Context) error {
	err := m.client.InqLockspace(ctx, m.cfg.Lockspace)
	if err == nil {
		return nil
	}
	if !errors.Is(err, syscall.ENOENT) {
		return fmt.Errorf("cluster mode: lockspace %s: %w", m.cfg.Lockspace.Name, err)
	}
	// Every host joins with the io_timeout the lockspace was initialised
	// with: sanlock's timeouts (a dead host's expiry among them) derive
	// from it, and hosts must agree on them.
	ioTimeout, err := m.client.ReadLockspace(ctx, m.cfg.Lockspace)
	if err != nil {
		return fmt.Errorf("cluster mode: read lockspace %s in %s: %w", m.cfg.Lockspace.Name, m.cfg.Lockspace.Disk.Path, err)
	}
	m.log.Info("joining lockspace", "lockspace", m.cfg.Lockspace.Name, "host_id", m.cfg.Lockspace.HostID,
		"disk", m.cfg.Lockspace.Disk.Path, "io_timeout", ioTimeout)
	if err := m.client.AddLockspace(ctx, m.cfg.Lockspace, ioTimeout); err != nil {
		return fmt.Errorf("cluster mode: join lockspace %s as host %d (%s): %w", m.cfg.Lockspace.Name,
			m.cfg.Lockspace.HostID, m.cfg.Lockspace.Disk.Path, err)
	}
	return nil
}

func (m *Manager) process(ctx context.Context) (*sanlock.Process, error) {
	m.mu.Lock()
	p := m.proc
	m.mu.Unlock()
	if p != nil {
		return p, nil
	}
	m.regMu.Lock()
	defer m.regMu.Unlock()
	m.mu.Lock()
	p = m.proc
	m.mu.Unlock()
	if p != nil { // registered while this one waited
		return p, nil
	}
	p, err := m.client.Register(ctx)
	if err != nil {
		return nil, err
	}
	// The guests keep their disks whatever happens to the daemon: killing it
	// when the lockspace fails would protect nothing. Fencing is the
	// watchdog's (docs/cluster.md).
	if err := p.Restrict(ctx, sanlock.RestrictSigkill|sanlock.RestrictSigterm); err != nil {
		p.Close()
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.proc = p
	return p, nil
}

// forgetBroken drops the registered connection when err says it broke (the
// sanlock daemon restarted or went away), so the next request registers
// again instead of failing forever. Leases of the old connection are
// sanlock's orphans by then: the next acquire of each adopts it.
func (m *Manager) forgetBroken(p *sanlock.Process, err error) {
	if !sanlock.Broken(err) {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.proc == p {
		m.log.Warn("connection to sanlock lost; registering again on the next request", "err", err)
		p.Close()
		m.proc = nil
	}
}

// Close closes the registered connection: sanlock keeps the leases as
// orphans for the next daemon.
func (m *Manager) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.closed:
	default:
		close(m.closed)
	}
	if m.proc == nil {
		return nil
	}
	err := m.proc.Close()
	m.proc = nil
	return err
}

// Acquire implements model.Leases: it takes (or joins) the lease of
// req.Target for req.Key, or refuses naming who holds it.
func (m *Manager) Acquire(ctx context.Context, req model.LeaseRequest) error {
	id, shared, err := m.cfg.identity(req.Target)
	if err != nil {
		return err
	}
	if !shared {
		return nil
	}
	name := Name(id)
	unlock := m.locks.Lock(name)
	defer unlock()

	m.mu.Lock()
	h := m.held[name]
	m.mu.Unlock()
	if h != nil {
		return m.join(ctx, h, req)
	}
	proc, err := m.process(ctx)
	if err != nil {
		return fmt.Errorf("cluster mode: lease of %s: %w", req.Target.Path, err)
	}
	res, err := m.resource(ctx, name)
	if err != nil {
		return fmt.Errorf("cluster mode: lease of %s: %w", req.Target.Path, err)
	}
	h = &holder{res: res, identity: id, target: req.Target.Path, users: map[model.Key]bool{}, shared: !req.Writable,
		since: time.Now(), done: make(chan struct{})}
	if h.shared {
		h.res.Flags |= sanlock.ResShared
	}
	start := time.Now()
	err = proc.Acquire(ctx, h.res, sanlock.AcquireOrphan|sanlock.AcquireOwnerNoWait, m.owner())
	m.forgetBroken(proc, err)
	if err != nil && !sanlock.Held(err) {
		return fmt.Errorf("cluster mode: lease of %s (%s): %w", req.Target.Path, name, err)
	}
	vm := vmOf(ctx, req)
	if vm == "" {
		vm = m.ownNoteVM(name) // recovery: our previous daemon's note knows the VM
	}
	h.vm = vm
	if err != nil {
		// Held elsewhere: a migration of this VM may start here while the
		// source still holds it; anything else is refused.
		owners := m.otherOwners(ctx, h.res)
		if !sameVM(vm, owners) {
			m.count(func(e *Events) { e.Refused++ })
			return m.refusal(req, name, owners, err)
		}
		h.pending = true
		h.users[req.Key] = req.Writable
		m.writeNote(h, req)
		m.mu.Lock()
		m.held[name] = h
		m.mu.Unlock()
		m.log.Info("lease held by the migration's source host: attaching, hand-over pending", "domid", req.Key.Domid,
			"devid", req.Key.Devid, "target", req.Target.Path, "lease", name, "vm", vm, "source", describe(owners))
		go m.handover(h, req)
		return nil
	}
	if rival := m.pendingRival(ctx, name, vm); rival != nil {
		// The source let go, but a migration's destination elsewhere is
		// using the disk for another VM and waits for this lease.
		if rerr := proc.Release(ctx, h.res, 0); rerr != nil {
			m.log.Error("release lease", "target", req.Target.Path, "lease", name, "err", rerr)
		}
		m.count(func(e *Events) { e.Refused++ })
		return m.refusal(req, name, []owned{*rival}, nil)
	}
	h.users[req.Key] = req.Writable
	m.writeNote(h, req)
	m.mu.Lock()
	m.held[name] = h
	m.events.Acquired++
	m.mu.Unlock()
	m.log.Debug("lease acquired", "domid", req.Key.Domid, "devid", req.Key.Devid, "target", req.Target.Path,
		"lease", name, "shared", h.shared, "took", time.Since(start))
	return nil
}

// join adds a backend to a lease this host holds already, converting a
// shared lease to exclusive for a writer (the local sharing rules have
// already allowed the two backends to share the target).
func (m *Manager) join(ctx context.Context, h *holder, req model.LeaseRequest) error {
	if req.Writable && h.shared && !h.pending {
		proc, err := m.process(ctx)
		if err != nil {
			return err
		}
		ex := h.res
		ex.Flags &^= sanlock.ResShared
		if err := proc.Convert(ctx, ex, sanlock.AcquireOwnerNoWait); err != nil {
			m.forgetBroken(proc, err)
			if !sanlock.Held(err) {
				return fmt.Errorf("cluster mode: lease of %s: %w", req.Target.Path, err)
			}
			m.count(func(e *Events) { e.Refused++ })
			return m.refusal(req, h.res.Name, m.otherOwners(ctx, h.res), err)
		}
		m.mu.Lock()
		h.res, h.shared = ex, false
		m.mu.Unlock()
	}
	m.mu.Lock()
	h.users[req.Key] = req.Writable
	m.mu.Unlock()
	return nil
}

// Release implements model.Leases: key no longer uses t; the lease goes
// with the target's last backend on this host.
func (m *Manager) Release(key model.Key, t model.Target) {
	id, shared, err := m.cfg.identity(t)
	if err != nil || !shared {
		return
	}
	name := Name(id)
	unlock := m.locks.Lock(name)
	defer unlock()
	m.mu.Lock()
	h := m.held[name]
	if h == nil {
		m.mu.Unlock()
		return
	}
	delete(h.users, key)
	if len(h.users) > 0 {
		writers := slices.Contains(slices.Collect(maps.Values(h.users)), true)
		downgrade := !writers && !h.shared && !h.pending
		m.mu.Unlock()
		if downgrade {
			m.downgrade(h)
		}
		return
	}
	delete(m.held, name)
	pending := h.pending
	close(h.done)
	proc := m.proc
	m.mu.Unlock()

	m.removeNote(h)
	if pending || proc == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := proc.Release(ctx, h.res, 0); err != nil {
		m.log.Error("release lease", "target", t.Path, "lease", name, "err", err)
		return
	}
	m.log.Debug("lease released", "target", t.Path, "lease", name)
}

// downgrade converts an exclusive lease to shared once only readers use it
// here, so other hosts' readers may have it again. Called with the lease
// lock held.
func (m *Manager) downgrade(h *holder) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	proc, err := m.process(ctx)
	if err != nil {
		return
	}
	sh := h.res
	sh.Flags |= sanlock.ResShared
	if err := proc.Convert(ctx, sh, 0); err != nil {
		m.forgetBroken(proc, err)
		m.log.Warn("lease: could not convert to shared once only readers are left; it stays exclusive",
			"target", h.target, "lease", h.res.Name, "err", err)
		return
	}
	m.mu.Lock()
	h.res, h.shared = sh, true
	m.mu.Unlock()
}

// ReleaseOrphans releases this host's orphaned leases that no attachment
// re-adopted (recovery calls it once every attachment is restored).
func (m *Manager) ReleaseOrphans(ctx context.Context) error {
	proc, err := m.process(ctx)
	if err != nil {
		return err
	}
	return proc.Release(ctx, sanlock.Resource{Lockspace: m.cfg.Lockspace.Name}, sanlock.ReleaseOrphan)
}

// handover retries the lease a migration's destination attached without,
// until the source lets go of it; past cfg.Handover it reports the wait
// (log, metrics) and keeps trying.
func (m *Manager) handover(h *holder, req model.LeaseRequest) {
	const retry = 100 * time.Millisecond
	deadline := time.NewTimer(m.cfg.Handover)
	defer deadline.Stop()
	tick := time.NewTicker(retry)
	defer tick.Stop()
	for {
		select {
		case <-h.done:
			return
		case <-m.closed:
			return
		case <-deadline.C:
			m.log.Error("lease hand-over not complete: the migration's source host still holds the lease",
				"target", h.target, "lease", h.res.Name, "waited", m.cfg.Handover,
				"source", describe(m.otherOwners(context.Background(), h.res)))
			m.count(func(e *Events) { e.HandoverOverdue++ })
		case <-tick.C:
			if m.tryHandover(h, req) {
				return
			}
		}
	}
}

func (m *Manager) tryHandover(h *holder, req model.LeaseRequest) bool {
	unlock := m.locks.Lock(h.res.Name)
	defer unlock()
	select {
	case <-h.done:
		return true
	default:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	proc, err := m.process(ctx)
	if err != nil {
		return false
	}
	if err := proc.Acquire(ctx, h.res, sanlock.AcquireOrphan|sanlock.AcquireOwnerNoWait, m.owner()); err != nil {
		m.forgetBroken(proc, err)
		select {
		case <-m.closed: // the daemon is stopping: its connection is gone
			return true
		default:
		}
		if !sanlock.Held(err) {
			m.log.Warn("lease hand-over: acquire", "lease", h.res.Name, "err", err)
		}
		return false
	}
	m.mu.Lock()
	h.pending = false
	m.mu.Unlock()
	m.writeNote(h, model.LeaseRequest{Key: req.Key, Writable: req.Writable})
	m.mu.Lock()
	waited := time.Since(h.since)
	h.since = time.Now()
	m.events.HandedOver++
	m.mu.Unlock()
	m.log.Info("lease handed over from the migration's source host", "target", h.target, "lease", h.res.Name,
		"waited", waited.Round(time.Millisecond))
	return true
}

// Leases lists the held leases, by target.
func (m *Manager) Leases() []Lease {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Lease, 0, len(m.held))
	for name, h := range m.held {
		mode := "exclusive"
		switch {
		case h.pending:
			mode = "pending"
		case h.shared:
			mode = "shared"
		}
		out = append(out, Lease{Name: name, Identity: h.identity, Target: h.target, Mode: mode, Users: len(h.users), Since: h.since})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Target < out[j].Target })
	return out
}

// Events returns the counters.
func (m *Manager) Events() Events {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.events
}

func (m *Manager) count(f func(*Events)) {
	m.mu.Lock()
	f(&m.events)
	m.mu.Unlock()
}

// owner is the name sanlock records for our leases (its status output).
func (m *Manager) owner() string {
	o := "xenblkd@" + m.cfg.HostName
	if len(o) > sanlock.NameLen {
		o = o[:sanlock.NameLen]
	}
	return o
}

// resource returns the lease's resource, making and initialising its file
// when no host has yet: initialised under a temporary name, then linked into
// place, so no host ever sees a lease file that is not a lease yet (link
// fails if another host won the race, and its file is used).
func (m *Manager) resource(ctx context.Context, name string) (sanlock.Resource, error) {
	path := filepath.Join(m.cfg.Dir, name+".lease")
	res := sanlock.Resource{Lockspace: m.cfg.Lockspace.Name, Name: name, Disk: sanlock.Disk{Path: path},
		Flags: sanlock.ResPersistent}
	if _, err := os.Stat(path); err == nil {
		return res, nil
	}
	tmp := filepath.Join(m.cfg.Dir, fmt.Sprintf(".%s.host%d.tmp", name, m.cfg.Lockspace.HostID))
	if err := os.WriteFile(tmp, make([]byte, 1<<20), 0o600); err != nil {
		return res, fmt.Errorf("make lease file: %w", err)
	}
	defer os.Remove(tmp)
	init := res
	init.Disk.Path = tmp
	if err := m.client.WriteResource(ctx, init); err != nil {
		return res, fmt.Errorf("initialise lease file %s: %w", tmp, err)
	}
	if err := os.Link(tmp, path); err != nil && !errors.Is(err, os.ErrExist) {
		return res, fmt.Errorf("make lease file: %w", err)
	}
	return res, nil
}

// note is what a holder writes beside the lease file.
type note struct {
	Host   string `json:"host"`
	HostID uint64 `json:"host_id"`
	VM     string `json:"vm,omitempty"`
	Domid  uint32 `json:"domid"`
	Devid  uint32 `json:"devid"`
	Mode   string `json:"mode"`
	// Pending: a migration's destination, using the disk before the
	// source let go of the lease; no other VM may take the lease meanwhile.
	Pending bool `json:"pending,omitempty"`
}

func (m *Manager) notePath(name string, hostID uint64) string {
	return filepath.Join(m.cfg.Dir, name+".host"+strconv.FormatUint(hostID, 10))
}

func (m *Manager) writeNote(h *holder, req model.LeaseRequest) {
	mode := "r"
	if req.Writable {
		mode = "w"
	}
	b, _ := json.Marshal(note{Host: m.cfg.HostName, HostID: m.cfg.Lockspace.HostID, VM: h.vm,
		Domid: req.Key.Domid, Devid: req.Key.Devid, Mode: mode, Pending: h.pending})
	path := m.notePath(h.res.Name, m.cfg.Lockspace.HostID)
	tmp := path + ".tmp"
	err := os.WriteFile(tmp, b, 0o644)
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		// Only messages and migrations need the note: the lease protects.
		m.log.Warn("write the lease's note", "path", path, "err", err)
	}
}

// ownNoteVM is the VM this host's note on the lease names, if any.
func (m *Manager) ownNoteVM(name string) string {
	var n note
	b, err := os.ReadFile(m.notePath(name, m.cfg.Lockspace.HostID))
	if err != nil || json.Unmarshal(b, &n) != nil {
		return ""
	}
	return n.VM
}

func (m *Manager) removeNote(h *holder) {
	os.Remove(m.notePath(h.res.Name, m.cfg.Lockspace.HostID))
}

// owned is another host holding a lease, with its note if it wrote one.
type owned struct {
	id   uint64
	note *note
}

// otherOwners reads the lease's owners from disk and their notes.
func (m *Manager) otherOwners(ctx context.Context, res sanlock.Resource) []owned {
	hosts, err := m.client.ReadResourceOwners(ctx, res)
	if err != nil {
		m.log.Warn("read the lease's owners", "lease", res.Name, "err", err)
	}
	var out []owned
	for _, h := range hosts {
		if h.ID == m.cfg.Lockspace.HostID {
			continue
		}
		o := owned{id: h.ID}
		if b, err := os.ReadFile(m.notePath(res.Name, h.ID)); err == nil {
			var n note
			if json.Unmarshal(b, &n) == nil && n.HostID == h.ID {
				o.note = &n
			}
		}
		out = append(out, o)
	}
	return out
}

// pendingRival returns another host's pending note on the lease for a VM
// other than vm, if that host is not known to be dead: a migration's
// destination that attached before its source let go, and that this host
// must not overtake. A note of a host sanlock reports dead or free is stale.
func (m *Manager) pendingRival(ctx context.Context, name, vm string) *owned {
	paths, _ := filepath.Glob(filepath.Join(m.cfg.Dir, name+".host*"))
	for _, p := range paths {
		b, err := os.ReadFile(p)
		var n note
		if err != nil || json.Unmarshal(b, &n) != nil || !n.Pending || n.HostID == m.cfg.Lockspace.HostID {
			continue
		}
		if vm != "" && n.VM == vm {
			continue
		}
		if hosts, err := m.client.Hosts(ctx, m.cfg.Lockspace.Name, n.HostID); err == nil && len(hosts) == 1 {
			if st := hosts[0].State(); st == sanlock.HostDead || st == sanlock.HostFree {
				continue
			}
		}
		return &owned{id: n.HostID, note: &n}
	}
	return nil
}

// sameVM reports whether every other owner's note names vm (a known VM):
// a migration of that VM.
func sameVM(vm string, owners []owned) bool {
	if vm == "" || len(owners) == 0 {
		return false
	}
	for _, o := range owners {
		if o.note == nil || o.note.VM != vm {
			return false
		}
	}
	return true
}

func describe(owners []owned) string {
	if len(owners) == 0 {
		return "another host (its lease not yet expired)"
	}
	var parts []string
	for _, o := range owners {
		s := fmt.Sprintf("host %d", o.id)
		if n := o.note; n != nil {
			s = fmt.Sprintf("host %s (sanlock host id %d), domain %d device %d", n.Host, o.id, n.Domid, n.Devid)
			if n.VM != "" {
				s += ", VM " + n.VM
			}
			if n.Mode == "w" {
				s += ", read-write"
			} else {
				s += ", read-only"
			}
			if n.Pending {
				s += " (migrated there: waiting for this host to let go of the lease)"
			}
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, "; ")
}

// RefusalError is a refusal because another host holds the target's lease.
type RefusalError struct {
	msg string
	Err error
}

func (e *RefusalError) Error() string { return e.msg }
func (e *RefusalError) Unwrap() error { return e.Err }

// Is makes a lease refusal a sharing conflict (model.ErrConflict): the
// daemon reports it as it reports the local sharing rules' refusals.
func (e *RefusalError) Is(target error) bool { return target == model.ErrConflict }

func (m *Manager) refusal(req model.LeaseRequest, name string, owners []owned, err error) error {
	what := "read-write"
	if !req.Writable {
		what = "read-only"
	}
	return &RefusalError{Err: err, msg: fmt.Sprintf("refusing to attach %s %s to %s %s: on shared storage it is in use on %s "+
		"(sanlock lease %s); detach it there first; if that host is dead, its lease expires on sanlock's timeouts "+
		"(8*io_timeout+60 s after it stopped renewing) and the disk can be attached then",
		req.Target.Kind, req.Target.Path, req.Key.Describe(), what, describe(owners), name)}
}

func vmOf(ctx context.Context, req model.LeaseRequest) string {
	if req.Domain == nil {
		return ""
	}
	return req.Domain(ctx, req.Key.Domid).VM
}
