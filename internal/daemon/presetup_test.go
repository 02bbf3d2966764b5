package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/lifecycle"
	"xenblkd/internal/model"
	"xenblkd/internal/xenstore"
	"xenblkd/internal/xenstore/xenstoretest"
)

// preEnv is a daemon with pre-setup on the in-memory XenStore.
type preEnv struct {
	d     *Daemon
	xs    *xenstore.Client
	store *countingStore // the daemon's store
	host  *fakeMachine
	img   string // a writable image file
	next  int    // settle's next devid
}

func startPresetup(t *testing.T, host model.Host, workers int, before func(*xenstore.Client)) *preEnv {
	t.Helper()
	ctx := context.Background()
	xs := dialTestStore(t, xenstoretest.Options{EventsBeforeReply: true})
	e := &preEnv{xs: xs, img: filepath.Join(t.TempDir(), "img")}
	if fh, ok := host.(*fakeMachine); ok {
		e.host = fh
	}
	if err := os.WriteFile(e.img, []byte("image"), 0o644); err != nil {
		t.Fatal(err)
	}
	if before != nil {
		before(xs)
	}
	e.store = &countingStore{Store: hotplug.ClientStore{Client: xs}}
	e.d = New(discard, e.store, host)
	stop, err := e.d.StartPresetup(ctx, xs, PresetupOptions{Workers: workers})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	return e
}

// libxlBackend writes a backend directory in one transaction, as libxl does,
// with state 1; "-" leaves a node out.
func libxlBackend(t *testing.T, xs *xenstore.Client, domid, devid int, script, params, mode string, extra ...string) hotplug.Backend {
	t.Helper()
	b := hotplug.Backend{Domid: uint32(domid), Devid: uint32(devid)}
	nodes := map[string]string{
		"frontend": fmt.Sprintf("/local/domain/%d/device/vbd/%d", domid, devid), "frontend-id": fmt.Sprint(domid),
		"online": "1", "state": "1", "dev": "xvda", "type": "phy", "device-type": "disk",
		"script": script, "params": params, "mode": mode,
	}
	for i := 0; i+1 < len(extra); i += 2 {
		nodes[extra[i]] = extra[i+1]
	}
	ctx := context.Background()
	err := xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		for k, v := range nodes {
			if v == "-" {
				continue
			}
			if err := tx.Write(ctx, b.Path()+"/"+k, v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const ourScript = "/etc/xen/scripts/xenblkd"

// waitFor is a readiness wait: it fails only if cond never holds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitState(t, what, func() (bool, string) { return cond(), "" })
}

// waitState is waitFor whose cond also says what it saw, for the failure.
func waitState(t *testing.T, what string, cond func() (ok bool, saw string)) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ok, saw := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s (last seen: %s)", what, saw)
		}
		time.Sleep(time.Millisecond)
	}
}

func (e *preEnv) node(t *testing.T, b hotplug.Backend, name string) (string, bool) {
	t.Helper()
	v, err := e.xs.Read(context.Background(), b.Path()+"/"+name)
	if errors.Is(err, unix.ENOENT) {
		return "", false
	}
	if err != nil {
		t.Fatal(err)
	}
	return v, true
}

func (e *preEnv) waitAttached(t *testing.T, b hotplug.Backend) string {
	t.Helper()
	var pd string
	waitFor(t, b.Path()+"/physical-device", func() bool {
		v, ok := e.node(t, b, "physical-device")
		pd = v
		return ok
	})
	return pd
}

// waitReleased waits until the model holds none of bs and host has open
// devices open. Both are waited for: model.Remove forgets the attachment
// first and closes its device after it drops the model's lock (so that
// lookups never wait on a close), so a test that only waited for the lookup
// could count the devices in between.
func (e *preEnv) waitReleased(t *testing.T, what string, host *fakeMachine, open int, bs ...hotplug.Backend) {
	t.Helper()
	waitState(t, fmt.Sprintf("%s: attachments gone and %d devices open", what, open), func() (bool, string) {
		held := 0
		for _, b := range bs {
			if _, ok := e.d.model.Lookup(keyOf(b)); ok {
				held++
			}
		}
		got := host.Open()
		return held == 0 && got == open, fmt.Sprintf("%d attachments held, %d devices open", held, got)
	})
}

// settle waits until every event before it was handled (Workers: 1, FIFO):
// a fresh backend of ours appears and gets set up.
func (e *preEnv) settle(t *testing.T) {
	t.Helper()
	e.next++
	img := filepath.Join(t.TempDir(), "settle")
	os.WriteFile(img, []byte("s"), 0o644)
	e.waitAttached(t, libxlBackend(t, e.xs, 9999, e.next, ourScript, img, "r"))
}

func (e *preEnv) exec(t *testing.T, op string, b hotplug.Backend) api.Response {
	t.Helper()
	return e.d.Handle(context.Background(), api.Request{Op: op, Path: b.Path()})
}

func TestPresetupAttachesBeforeExec(t *testing.T) {
	host := newHost()
	e := startPresetup(t, host, 1, nil)
	b := libxlBackend(t, e.xs, 1, 51712, ourScript, e.img, "w")
	pd := e.waitAttached(t, b)
	if st, _ := e.node(t, b, "hotplug-status"); st != "connected" || host.Open() != 1 {
		t.Fatalf("before exec: hotplug-status %q, %d devices; want connected, 1", st, host.Open())
	}
	// Recorded just after the add's transaction, which the test may see first.
	waitFor(t, "pre-setup state", func() bool { return e.d.backends.Get(keyOf(b)).Phase == lifecycle.PresetUp })
	if got := sampleCount(t, e.d, "xenblkd_presetup_duration_seconds"); got != 1 {
		t.Errorf("pre-setup attaches timed: %d, want 1", got)
	}
	e.store.ops(b.Path())
	resp := e.exec(t, "add", b)
	if !resp.OK || resp.Attachment == nil || resp.Attachment.PhysicalDevice != pd {
		t.Fatalf("exec'd add: %+v; want OK confirming %s", resp, pd)
	}
	// The exec'd confirm is timed as a request; the attach stays pre-setup's.
	if pre, add := sampleCount(t, e.d, "xenblkd_presetup_duration_seconds"), sampleCount(t, e.d, "xenblkd_request_duration_seconds", "op", "add"); pre != 1 || add != 1 {
		t.Errorf("timed: %d pre-setup attaches, %d adds; want 1, 1", pre, add)
	}
	// The confirm reads the add's snapshot (one batch: the directory may
	// have been written again since pre-setup attached it), nothing else.
	e.store.mu.Lock()
	requests := e.store.requests
	e.store.mu.Unlock()
	if reads, txs := e.store.ops(b.Path()); reads != 4 || txs != 0 || requests != 4 {
		t.Errorf("confirm did %d XenStore reads, %d transactions, %d requests in all; want the snapshot's 4, 0, 4", reads, txs, requests)
	}
	if host.Open() != 1 || host.Made() != 1 {
		t.Fatalf("after exec: %d devices open, %d made; want 1, 1", host.Open(), host.Made())
	}
	if resp := e.exec(t, "remove", b); !resp.OK || host.Open() != 0 {
		t.Fatalf("remove: %+v, %d devices", resp, host.Open())
	}
	// The backend lingers without physical-device (state unchanged here):
	// pre-setup must not attach it again.
	e.settle(t)
	if _, ok := e.node(t, b, "physical-device"); ok || host.Made() != 2 {
		t.Fatalf("re-attached after remove (devices made: %d)", host.Made())
	}
}

func TestPresetupBackendGoneBeforeExec(t *testing.T) {
	host := newHost()
	e := startPresetup(t, host, 1, nil)
	for i, remove := range []string{"backend", "domain"} {
		b := libxlBackend(t, e.xs, 10+i, 51712, ourScript, e.img, "w")
		e.waitAttached(t, b)
		p := b.Path()
		if remove == "domain" {
			p = fmt.Sprintf("backend/vbd/%d", b.Domid)
		}
		if err := e.xs.Rm(context.Background(), p); err != nil {
			t.Fatal(err)
		}
		e.waitReleased(t, "release of "+remove, host, 0, b)
		if st := e.d.backends.Get(keyOf(b)); st.Known() {
			t.Fatalf("%s removed: state %+v still remembered", remove, st)
		}
	}
}

// gatedHost blocks NewLoop until released, to hold a pre-setup in flight.
type gatedHost struct {
	*fakeMachine
	entered chan struct{}
	gate    chan struct{}
}

func (h *gatedHost) NewLoop(f *os.File, ro bool) (model.Device, error) {
	h.entered <- struct{}{}
	<-h.gate
	return h.fakeMachine.NewLoop(f, ro)
}

func TestPresetupExecDuringPresetup(t *testing.T) {
	host := &gatedHost{fakeMachine: newHost(), entered: make(chan struct{}), gate: make(chan struct{})}
	e := startPresetup(t, host, 1, nil)
	b := libxlBackend(t, e.xs, 2, 51712, ourScript, e.img, "w")
	<-host.entered // pre-setup is inside model.Add
	done := make(chan api.Response)
	go func() { done <- e.exec(t, "add", b) }()
	close(host.gate) // the exec'd add may run now; it must wait for pre-setup's lock
	resp := <-done
	if !resp.OK || host.fakeMachine.Open() != 1 || host.fakeMachine.Made() != 1 {
		t.Fatalf("exec'd add: %+v, %d devices open, %d made; want OK, 1, 1", resp, host.fakeMachine.Open(), host.fakeMachine.Made())
	}
}

func TestPresetupExecFirst(t *testing.T) {
	host := newHost()
	e := startPresetup(t, host, 4, nil)
	const n = 40
	var wg sync.WaitGroup
	for i := range n {
		img := e.img + "-" + fmt.Sprint(i)
		os.WriteFile(img, []byte("x"), 0o644)
		b := libxlBackend(t, e.xs, 20+i, 51712, ourScript, img, "w")
		wg.Go(func() {
			// Right after the transaction commits: races pre-setup.
			if resp := e.exec(t, "add", b); !resp.OK {
				t.Errorf("add %s: %+v", b, resp)
			}
		})
	}
	wg.Wait()
	if host.Open() != n || host.Made() != n {
		t.Fatalf("%d devices open, %d made; want %d, %d", host.Open(), host.Made(), n, n)
	}
}

func TestPresetupFailureReported(t *testing.T) {
	host := newHost()
	e := startPresetup(t, host, 1, nil)
	first := libxlBackend(t, e.xs, 3, 51712, ourScript, e.img, "w")
	e.waitAttached(t, first)
	tests := []struct {
		name         string
		params, mode string
		want         string
	}{
		{"sharing conflict", e.img, "w", "domain 3 device 51712 (xvda) already uses it read-write (mode w"},
		{"nonexistent", "/nonexistent/xenblkd.img", "w", "no such file or device"},
		{"bad mode", e.img, "x", `unknown mode "x"`},
		{"no params", "-", "w", "params is missing"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := libxlBackend(t, e.xs, 30+i, 51712, ourScript, tt.params, tt.mode)
			waitFor(t, "pre-setup failure", func() bool { return e.d.backends.Get(keyOf(b)).Phase == lifecycle.Refused })
			if _, ok := e.node(t, b, "hotplug-error"); ok {
				t.Error("hotplug-error written before the script ran")
			}
			resp := e.exec(t, "add", b)
			if resp.OK || !resp.ErrorRecorded || !strings.Contains(resp.Error, tt.want) {
				t.Fatalf("exec'd add: %+v; want a recorded error containing %q", resp, tt.want)
			}
			if got, _ := e.node(t, b, "hotplug-error"); got != resp.Error {
				t.Errorf("hotplug-error = %q, want %q", got, resp.Error)
			}
			if _, ok := e.node(t, b, "physical-device"); ok {
				t.Error("physical-device written for a refused backend")
			}
		})
	}
	if host.Open() != 1 {
		t.Fatalf("%d devices open, want 1", host.Open())
	}
	// A failure is forgotten when its backend goes away.
	b := libxlBackend(t, e.xs, 40, 51712, ourScript, "/nonexistent/x", "w")
	waitFor(t, "pre-setup failure", func() bool { return e.d.backends.Get(keyOf(b)).Phase == lifecycle.Refused })
	e.xs.Rm(context.Background(), b.Path())
	waitFor(t, "failure forgotten", func() bool { return !e.d.backends.Get(keyOf(b)).Known() })
}

func TestPresetupLeavesOthersAlone(t *testing.T) {
	host := newHost()
	e := startPresetup(t, host, 1, nil)
	foreign := libxlBackend(t, e.xs, 50, 51712, "/etc/xen/scripts/block", e.img, "w")
	noScript := libxlBackend(t, e.xs, 51, 51712, "-", e.img, "w")
	pastInitWait := libxlBackend(t, e.xs, 52, 51712, ourScript, e.img, "w", "state", "4")
	preset := libxlBackend(t, e.xs, 53, 51712, ourScript, e.img, "w", "physical-device", "8:1")
	e.settle(t)
	for _, b := range []hotplug.Backend{foreign, noScript, pastInitWait} {
		for _, n := range []string{"physical-device", "hotplug-error", "hotplug-status"} {
			if v, ok := e.node(t, b, n); ok {
				t.Errorf("%s/%s = %q written", b, n, v)
			}
		}
	}
	if v, _ := e.node(t, preset, "physical-device"); v != "8:1" {
		t.Errorf("physical-device rewritten to %q", v)
	}
	if _, ok := e.node(t, preset, "hotplug-status"); ok {
		t.Error("hotplug-status written to a backend with physical-device set")
	}
	if host.Made() != 1 { // settle's own
		t.Errorf("%d devices made, want 1 (settle's)", host.Made())
	}
}

func TestPresetupRescanAtStart(t *testing.T) {
	host := newHost()
	var pending hotplug.Backend
	img := filepath.Join(t.TempDir(), "early")
	os.WriteFile(img, []byte("e"), 0o644)
	e := startPresetup(t, host, 1, func(xs *xenstore.Client) {
		pending = libxlBackend(t, xs, 60, 51712, ourScript, img, "r")
	})
	e.waitAttached(t, pending)
}

// TestPresetupStorm: many backends at once, as the benchmark's 2,000
// read-only attachments of one image: all set up, one device, nothing left
// queued.
func TestPresetupStorm(t *testing.T) {
	host := newHost()
	e := startPresetup(t, host, DefaultPresetupWorkers, nil)
	domains, perDomain := 10, 20
	var bs []hotplug.Backend
	for dom := range domains {
		for dev := range perDomain {
			bs = append(bs, libxlBackend(t, e.xs, 100+dom, 51712+dev, ourScript, e.img, "r"))
		}
	}
	for _, b := range bs {
		e.waitAttached(t, b)
	}
	if host.Made() != 1 || len(e.d.model.Held()) != 1 {
		t.Fatalf("%d devices made, %d held; want 1", host.Made(), len(e.d.model.Held()))
	}
	// Everything coalesced and drained: no backlog kept.
	e.settle(t)
	// Remove them all before any script ran: everything is released.
	if err := e.xs.Rm(context.Background(), "backend/vbd"); err != nil {
		t.Fatal(err)
	}
	e.waitReleased(t, "release of all", host, 0, bs...)
	waitFor(t, "state forgotten", func() bool { return len(e.d.backends.Keys(0, true)) == 0 })
}

// countingStore counts the daemon's reads per path.
type countingStore struct {
	hotplug.Store
	mu           sync.Mutex
	reads        map[string]int // guarded by mu
	transactions int            // guarded by mu
	requests     int            // guarded by mu: every operation of a batch, any path
}

func (s *countingStore) Transact(ctx context.Context, fn func(tx hotplug.Batcher) error) error {
	s.mu.Lock()
	s.transactions++
	s.mu.Unlock()
	return s.Store.Transact(ctx, fn)
}

// ops returns the reads of dir or below it and all transactions, and resets them.
func (s *countingStore) ops(dir string) (reads, transactions int) {
	reads = s.readsUnder(dir)
	s.mu.Lock()
	defer s.mu.Unlock()
	transactions, s.transactions = s.transactions, 0
	s.requests = 0
	return reads, transactions
}

func (s *countingStore) Batch(ctx context.Context, ops []xenstore.Op) []xenstore.Reply {
	s.mu.Lock()
	if s.reads == nil {
		s.reads = map[string]int{}
	}
	s.requests += len(ops)
	for _, op := range ops {
		if op.Type == xenstore.OpRead {
			s.reads[op.Path]++
		}
	}
	s.mu.Unlock()
	return s.Store.Batch(ctx, ops)
}

// readsUnder returns how many reads were of dir or below it, and resets them.
func (s *countingStore) readsUnder(dir string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for p, c := range s.reads {
		if p == dir || strings.HasPrefix(p, dir+"/") {
			n += c
			delete(s.reads, p)
		}
	}
	return n
}

func TestPresetupSkipsEventsItNeedNotCheck(t *testing.T) {
	host := newHost()
	e := startPresetup(t, host, 1, nil)
	ctx := context.Background()
	b := libxlBackend(t, e.xs, 3, 51712, ourScript, e.img, "w")
	e.waitAttached(t, b)
	e.settle(t)
	e.store.readsUnder(b.Path())

	// Our own nodes rewritten, and nodes xen-blkback writes: nothing to check.
	for _, n := range []string{"hotplug-status", "physical-device-path", "diskseq", "feature-barrier", "sectors", "queue-0/ring-ref"} {
		if err := e.xs.Write(ctx, b.Path()+"/"+n, "1"); err != nil {
			t.Fatal(err)
		}
	}
	e.settle(t)
	if got := e.store.readsUnder(b.Path()); got != 0 {
		t.Errorf("events for nodes pre-setup need not check: %d reads of %s, want 0", got, b.Path())
	}

	// The directory removed: released; re-created: attached again.
	open, made := host.Open(), host.Made()
	if err := e.xs.Rm(ctx, b.Path()); err != nil {
		t.Fatal(err)
	}
	e.waitReleased(t, "release", host, open-1, b)
	libxlBackend(t, e.xs, 3, 51712, ourScript, e.img, "w")
	e.waitAttached(t, b)
	if host.Open() != open || host.Made() != made+1 {
		t.Fatalf("re-created: %d devices open, %d made; want %d, %d", host.Open(), host.Made(), open, made+1)
	}
}

// TestPresetupRefusalDecidedAgain: a refusal found by pre-setup is decided
// afresh by the exec'd add. Domain A holds an image read-write, so pre-setup
// refuses B's backend for it; A's disk is removed before B's script runs, and
// B's exec'd add then attaches it.
func TestPresetupRefusalDecidedAgain(t *testing.T) {
	host := newHost()
	e := startPresetup(t, host, 1, nil)
	a := libxlBackend(t, e.xs, 3, 51712, ourScript, e.img, "w")
	e.waitAttached(t, a)
	b := libxlBackend(t, e.xs, 4, 51712, ourScript, e.img, "w")
	waitFor(t, "pre-setup's refusal", func() bool { return e.d.backends.Get(keyOf(b)).Phase == lifecycle.Refused })
	if resp := e.exec(t, api.OpRemove, a); !resp.OK {
		t.Fatalf("remove of A: %+v", resp)
	}
	if err := e.xs.Rm(context.Background(), a.Path()); err != nil {
		t.Fatal(err)
	}
	resp := e.exec(t, api.OpAdd, b)
	if !resp.OK || resp.Attachment == nil {
		t.Fatalf("B's exec'd add after A let go: %+v; want it attached", resp)
	}
	if v, ok := e.node(t, b, "hotplug-error"); ok {
		t.Errorf("hotplug-error = %q after a successful add", v)
	}
	if host.Open() != 1 {
		t.Errorf("%d devices open, want 1 (B's)", host.Open())
	}
}

// onceGatedHost blocks the first NewLoop until gate is closed; later ones
// pass.
type onceGatedHost struct {
	*fakeMachine
	once    sync.Once
	entered chan struct{}
	gate    chan struct{}
}

func (h *onceGatedHost) NewLoop(f *os.File, ro bool) (model.Device, error) {
	h.once.Do(func() {
		close(h.entered)
		<-h.gate
	})
	return h.fakeMachine.NewLoop(f, ro)
}

// TestPresetupBackendRecreatedDuringAttach: pre-setup attaches a backend
// from its snapshot; before its result is written, libxl removes the
// directory and writes it again for another disk (test/recovery's TestChaos:
// a removed disk's lingering directory, set up again by a restarted daemon's
// rescan, then re-created by the next add of that devid). The device made
// for the old request must not be written into the new directory, whose add
// would confirm it: a VM given the wrong image, and a restart's recovery
// then finds physical-device bound to a file params does not name and
// removes it under the VM.
func TestPresetupBackendRecreatedDuringAttach(t *testing.T) {
	host := &onceGatedHost{fakeMachine: newHost(), entered: make(chan struct{}), gate: make(chan struct{})}
	e := startPresetup(t, host, 1, nil)
	old := filepath.Join(t.TempDir(), "old.img")
	if err := os.WriteFile(old, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	b := libxlBackend(t, e.xs, 7, 51713, ourScript, old, "w")
	<-host.entered // pre-setup is inside model.Add, for old
	if err := e.xs.Rm(context.Background(), b.Path()); err != nil {
		t.Fatal(err)
	}
	libxlBackend(t, e.xs, 7, 51713, ourScript, e.img, "w")
	close(host.gate)
	// Pre-setup's step for old ends (its lock is free again) before the
	// exec'd add of the new directory takes it.
	waitFor(t, "pre-setup's attach of the old request to end", func() bool {
		unlock := e.d.backends.Lock(keyOf(b))
		defer unlock()
		return host.Made() >= 1
	})
	resp := e.exec(t, api.OpAdd, b)
	if !resp.OK || resp.Attachment == nil {
		t.Fatalf("exec'd add of the new directory: %+v; want it attached", resp)
	}
	a, ok := e.d.model.Lookup(keyOf(b))
	if !ok || a.Params != e.img {
		t.Fatalf("attached %q (held: %v), want the new directory's params %q", a.Params, ok, e.img)
	}
	if pd, _ := e.node(t, b, "physical-device"); pd != resp.Attachment.PhysicalDevice {
		t.Fatalf("physical-device %q, the add answered %q", pd, resp.Attachment.PhysicalDevice)
	}
	// A restart (no fd store; the device still held, as by blkback) takes
	// the backend back: physical-device stays (TestChaos's "physical-device
	// is missing" was this recovery finding the old image's device).
	d := New(discard, hotplug.ClientStore{Client: e.xs}, host.fakeMachine)
	sum, err := d.Recover(context.Background(), RecoverOptions{})
	if err != nil || sum.Restored != 1 || sum.Mismatched != 0 {
		t.Fatalf("Recover: %+v, %v; want the backend restored", sum, err)
	}
	if pd, ok := e.node(t, b, "physical-device"); !ok || pd != resp.Attachment.PhysicalDevice {
		t.Fatalf("after recovery: physical-device %q (present: %v), want %q", pd, ok, resp.Attachment.PhysicalDevice)
	}
}

// gateFor blocks NewLoop for one image until gate is closed.
type gateFor struct {
	*fakeMachine
	image   string
	entered chan struct{}
	gate    chan struct{}
}

func (h *gateFor) NewLoop(f *os.File, ro bool) (model.Device, error) {
	if f.Name() == h.image {
		close(h.entered)
		<-h.gate
	}
	return h.fakeMachine.NewLoop(f, ro)
}

// TestPresetupBackendRecreatedBeforeExec: pre-setup attached a backend; its
// directory is removed and written again (another disk) before pre-setup's
// watch got to the removal (its queue is behind: here its one worker is
// busy with another backend), and the exec'd add of the new directory comes
// first. The add must not confirm the attachment made for the gone
// directory: the new one has no physical-device, so libxl would see the add
// succeed and blkback never get a device.
func TestPresetupBackendRecreatedBeforeExec(t *testing.T) {
	busy := filepath.Join(t.TempDir(), "busy.img")
	if err := os.WriteFile(busy, []byte("busy"), 0o644); err != nil {
		t.Fatal(err)
	}
	host := &gateFor{fakeMachine: newHost(), image: busy, entered: make(chan struct{}), gate: make(chan struct{})}
	e := startPresetup(t, host, 1, nil)
	defer close(host.gate)
	old := filepath.Join(t.TempDir(), "old.img")
	if err := os.WriteFile(old, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	b := libxlBackend(t, e.xs, 7, 51713, ourScript, old, "w")
	e.waitAttached(t, b)
	waitFor(t, "pre-setup's record", func() bool { return e.d.backends.Get(keyOf(b)).Phase == lifecycle.PresetUp })
	libxlBackend(t, e.xs, 8, 51712, ourScript, busy, "r")
	<-host.entered // pre-setup's only worker is busy
	if err := e.xs.Rm(context.Background(), b.Path()); err != nil {
		t.Fatal(err)
	}
	libxlBackend(t, e.xs, 7, 51713, ourScript, e.img, "w")
	resp := e.exec(t, api.OpAdd, b)
	if !resp.OK || resp.Attachment == nil {
		t.Fatalf("exec'd add of the new directory: %+v; want it attached", resp)
	}
	if pd, ok := e.node(t, b, "physical-device"); !ok || pd != resp.Attachment.PhysicalDevice {
		t.Fatalf("physical-device %q (present: %v), the add answered %q", pd, ok, resp.Attachment.PhysicalDevice)
	}
	if a, ok := e.d.model.Lookup(keyOf(b)); !ok || a.Params != e.img {
		t.Fatalf("attached %q (held: %v), want the new directory's params %q", a.Params, ok, e.img)
	}
}
