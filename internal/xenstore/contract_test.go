package xenstore_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/testenv"
	"xenblkd/internal/xenstore"
	"xenblkd/internal/xenstore/xenstoretest"
	"xenblkd/test/trixie"
	"xenblkd/test/xenstored"
)

// backend is one XenStore peer the contract suite runs against.
type backend struct {
	socket string
	// eventsBeforeReply: the peer sends the watch events a request triggers
	// on the requesting connection before the reply (C xenstored).
	eventsBeforeReply bool
	freeze, thaw      func(t *testing.T) // stop / resume answering
	kill, restart     func(t *testing.T)
}

// backends starts each peer on demand; real daemons are private to the test.
// The host's are Debian 12's (Xen 4.17), the trixie ones Debian 13's (4.20).
var backends = []struct {
	name  string
	start func(t *testing.T) *backend
}{
	{"fake", func(t *testing.T) *backend { return fakeBackend(t, false) }},
	{"fake-events-first", func(t *testing.T) *backend { return fakeBackend(t, true) }},
	{"cxenstored", func(t *testing.T) *backend { return daemonBackend(t, xenstored.C, "") }},
	{"oxenstored", func(t *testing.T) *backend { return daemonBackend(t, xenstored.OCaml, "") }},
	{"cxenstored-trixie", func(t *testing.T) *backend { return daemonBackend(t, xenstored.C, trixieRoot(t)) }},
	{"oxenstored-trixie", func(t *testing.T) *backend { return daemonBackend(t, xenstored.OCaml, trixieRoot(t)) }},
}

// trixieRoot is the cached Debian 13 root, or skips the test (fails it in CI).
func trixieRoot(t *testing.T) string {
	root, err := trixie.Root()
	if err != nil {
		testenv.Skip(t, err.Error())
	}
	return root
}

func fakeBackend(t *testing.T, eventsFirst bool) *backend {
	s := xenstoretest.NewServer(t, xenstoretest.Options{EventsBeforeReply: eventsFirst})
	return &backend{
		socket:            s.Socket,
		eventsBeforeReply: eventsFirst,
		freeze:            func(*testing.T) { s.Freeze() },
		thaw:              func(*testing.T) { s.Thaw() },
		kill:              func(*testing.T) { s.Kill() },
		restart: func(t *testing.T) {
			if err := s.Restart(); err != nil {
				t.Fatal(err)
			}
		},
	}
}

func daemonBackend(t *testing.T, kind xenstored.Kind, root string) *backend {
	d := xenstored.StartIn(t, kind, root)
	signal := func(sig syscall.Signal) func(t *testing.T) {
		return func(t *testing.T) {
			if err := syscall.Kill(d.Pid, sig); err != nil {
				t.Fatalf("signal %v to %s pid %d: %v", sig, kind, d.Pid, err)
			}
		}
	}
	return &backend{
		socket:            d.Socket,
		eventsBeforeReply: kind == xenstored.C,
		freeze:            signal(syscall.SIGSTOP),
		thaw:              signal(syscall.SIGCONT),
		kill: func(t *testing.T) {
			if err := d.Kill(); err != nil {
				t.Fatal(err)
			}
		},
		restart: func(t *testing.T) {
			if err := d.Restart(); err != nil {
				t.Fatal(err)
			}
		},
	}
}

// contract is the suite every peer must pass. Cases share one peer and use
// their own subtree; cases that kill the peer start their own.
var contract = []struct {
	name string
	run  func(t *testing.T, b *backend)
}{
	{"RoundTrip", testRoundTrip},
	{"Batch", testBatch},
	{"Errors", testErrors},
	{"Perms", testPerms},
	{"TransactionConflict", testTransactionConflict},
	{"TransactionRetry", testTransactionRetry},
	{"TransactionView", testTransactionView},
	{"WatchEvents", testWatchEvents},
	{"WatchEventBeforeReply", testWatchEventBeforeReply},
	{"PeerOrdering", testPeerOrdering},
	{"Hammer", testHammer},
	{"PayloadLimit", testPayloadLimit},
	{"LargeDirectory", testLargeDirectory},
	{"Cancel", testCancel},
	{"Close", testClose},
}

func TestContract(t *testing.T) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) {
			b := be.start(t)
			for _, tc := range contract {
				t.Run(tc.name, func(t *testing.T) { tc.run(t, b) })
			}
			// Needs a peer of its own: it kills and restarts it.
			t.Run("KillRestart", func(t *testing.T) { testKillRestart(t, be.start(t)) })
			t.Run("IdleRedial", func(t *testing.T) { testIdleRedial(t, be.start(t)) })
		})
	}
}

// ctx bounds a test so that a hang becomes a failure, never a stuck run.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func dial(t *testing.T, b *backend) *xenstore.Client {
	t.Helper()
	c, err := xenstore.DialUnix(testCtx(t), b.socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// root returns a fresh absolute test subtree, removed at the end.
func root(t *testing.T, c *xenstore.Client) string {
	name := strings.NewReplacer("/", "-", "#", "-").Replace(t.Name())
	r := "/xbtest/" + name
	t.Cleanup(func() { c.Rm(context.Background(), r) })
	return r
}

func mustWrite(t *testing.T, o xenstore.Ops, path, value string) {
	t.Helper()
	if err := o.Write(testCtx(t), path, value); err != nil {
		t.Fatal(err)
	}
}

// testBatch: a batch's replies come back in order, each as the single call
// would return it; inside a transaction a batch's writes are kept or dropped
// with the transaction, and a failed operation does not poison it.
func testBatch(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c := dial(t, b)
	r := root(t, c)
	mustWrite(t, c, r+"/a", "1")
	got := c.Batch(ctx, []xenstore.Op{
		xenstore.Write(r+"/b", "2"), xenstore.Read(r + "/b"), xenstore.Read(r + "/missing"),
		xenstore.Directory(r), xenstore.GetPerms(r + "/a"), xenstore.Rm(r + "/a"), xenstore.Read(r + "/a"),
	})
	names := got[3].Names
	slices.Sort(names)
	switch {
	case got[0].Err != nil || got[1].Value != "2" || got[1].Err != nil:
		t.Errorf("write then read in one batch: %v, %q %v", got[0].Err, got[1].Value, got[1].Err)
	case !errors.Is(got[2].Err, unix.ENOENT):
		t.Errorf("read of a missing node: %v, want ENOENT", got[2].Err)
	case !slices.Equal(names, []string{"a", "b"}) || got[3].Err != nil:
		t.Errorf("directory: %q %v", names, got[3].Err)
	case len(got[4].Perms) == 0 || got[4].Err != nil:
		t.Errorf("get-perms: %v %v", got[4].Perms, got[4].Err)
	case got[5].Err != nil || !errors.Is(got[6].Err, unix.ENOENT):
		t.Errorf("rm then read: %v, %v", got[5].Err, got[6].Err)
	}
	for _, commit := range []bool{false, true} {
		tx, err := c.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		res := tx.Batch(ctx, []xenstore.Op{xenstore.Read(r + "/nothing"), xenstore.Write(r+"/t", strconv.FormatBool(commit))})
		if !errors.Is(res[0].Err, unix.ENOENT) || res[1].Err != nil {
			t.Fatalf("batch in a transaction: %v, %v", res[0].Err, res[1].Err)
		}
		if commit {
			err = tx.Commit(ctx)
		} else {
			err = tx.Abort(ctx)
		}
		if err != nil {
			t.Fatalf("end (commit %v): %v", commit, err)
		}
		v, err := c.Read(ctx, r+"/t")
		if commit && (err != nil || v != "true") || !commit && !errors.Is(err, unix.ENOENT) {
			t.Errorf("after a batch in a transaction ended with commit=%v: %q, %v", commit, v, err)
		}
	}
	if got := c.Batch(ctx, nil); len(got) != 0 {
		t.Errorf("empty batch: %d replies", len(got))
	}
}

func testRoundTrip(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c := dial(t, b)
	r := root(t, c)
	values := []struct{ path, value string }{
		{r + "/a", "1"},
		{r + "/b", ""},
		{r + "/c/d/e", "deep\nline two"},
		{r + "/f", strings.Repeat("x", 1000)},
	}
	for _, v := range values {
		mustWrite(t, c, v.path, v.value)
	}
	for _, v := range values {
		got, err := c.Read(ctx, v.path)
		if err != nil || got != v.value {
			t.Errorf("Read(%s) = %q, %v; want %q", v.path, got, err, v.value)
		}
	}
	if err := c.Mkdir(ctx, r+"/m"); err != nil {
		t.Fatal(err)
	}
	if err := c.Mkdir(ctx, r+"/a"); err != nil { // existing: kept
		t.Errorf("Mkdir of an existing node: %v", err)
	}
	if got, _ := c.Read(ctx, r+"/a"); got != "1" {
		t.Errorf("Mkdir changed an existing node's value to %q", got)
	}
	names, err := c.Directory(ctx, r)
	slices.Sort(names)
	if want := []string{"a", "b", "c", "f", "m"}; err != nil || !slices.Equal(names, want) {
		t.Errorf("Directory(%s) = %q, %v; want %q", r, names, err, want)
	}
	if names, err := c.Directory(ctx, r+"/c/d/e"); err != nil || len(names) != 0 {
		t.Errorf("Directory of a leaf = %q, %v; want empty", names, err)
	}
	if err := c.Rm(ctx, r+"/c"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(ctx, r+"/c/d/e"); !errors.Is(err, unix.ENOENT) {
		t.Errorf("Read below a removed node: got %v, want ENOENT", err)
	}

	// Relative paths resolve against /local/domain/0 for a dom0 socket client.
	rel := "xbtest-rel/" + strings.ReplaceAll(t.Name(), "/", "-")
	t.Cleanup(func() { c.Rm(context.Background(), "xbtest-rel") })
	mustWrite(t, c, rel+"/k", "v")
	if got, err := c.Read(ctx, "/local/domain/0/"+rel+"/k"); err != nil || got != "v" {
		t.Errorf("relative write, absolute read: %q, %v; want v", got, err)
	}
	if names, err := c.Directory(ctx, rel); err != nil || !slices.Equal(names, []string{"k"}) {
		t.Errorf("relative Directory = %q, %v", names, err)
	}
}

func testErrors(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c := dial(t, b)
	r := root(t, c)
	_, err := c.Read(ctx, r+"/missing")
	if !errors.Is(err, unix.ENOENT) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Read of a missing node: got %v, want ENOENT / fs.ErrNotExist", err)
	}
	var xe *xenstore.Error
	if !errors.As(err, &xe) || xe.Op != "read" || xe.Path != r+"/missing" {
		t.Errorf("error %#v does not name op and path", err)
	}
	if _, err := c.Directory(ctx, r+"/missing"); !errors.Is(err, unix.ENOENT) {
		t.Errorf("Directory of a missing node: got %v, want ENOENT", err)
	}
	if err := c.Rm(ctx, "/xbtest-none/x/y"); !errors.Is(err, unix.ENOENT) {
		t.Errorf("Rm below a missing parent: got %v, want ENOENT", err)
	}
	for _, bad := range []string{"", "/a//b", "/a/b/"} {
		if err := c.Write(ctx, bad, "v"); !errors.Is(err, unix.EINVAL) {
			t.Errorf("Write(%q): got %v, want EINVAL", bad, err)
		}
	}
	// The connection survives error replies.
	mustWrite(t, c, r+"/ok", "1")
}

func testPerms(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c := dial(t, b)
	r := root(t, c)
	mustWrite(t, c, r+"/p", "v")
	perms, err := c.GetPerms(ctx, r+"/p")
	if err != nil || len(perms) == 0 || perms[0].Domid != 0 {
		t.Fatalf("GetPerms of a new dom0 node = %v, %v; want owner 0", perms, err)
	}
	want := []xenstore.Perm{{Domid: 0, Access: 'n'}, {Domid: 5, Access: 'r'}, {Domid: 7, Access: 'b'}}
	if err := c.SetPerms(ctx, r+"/p", want); err != nil {
		t.Fatal(err)
	}
	if got, err := c.GetPerms(ctx, r+"/p"); err != nil || !slices.Equal(got, want) {
		t.Errorf("GetPerms = %v, %v; want %v", got, err, want)
	}
	// Children inherit the parent's permissions when created.
	mustWrite(t, c, r+"/p/child", "v")
	if got, err := c.GetPerms(ctx, r+"/p/child"); err != nil || !slices.Equal(got, want) {
		t.Errorf("GetPerms of a new child = %v, %v; want inherited %v", got, err, want)
	}
	// dom0 is privileged: "n" for everyone does not stop it reading.
	if _, err := c.Read(ctx, r+"/p"); err != nil {
		t.Errorf("dom0 read of an 'n0' node: %v", err)
	}
	if err := c.SetPerms(ctx, r+"/missing", want); !errors.Is(err, unix.ENOENT) {
		t.Errorf("SetPerms of a missing node: got %v, want ENOENT", err)
	}
	if err := c.SetPerms(ctx, r+"/p", []xenstore.Perm{{Access: 'x'}}); !errors.Is(err, unix.EINVAL) {
		t.Errorf("SetPerms with access 'x': got %v, want EINVAL", err)
	}
}

func testTransactionConflict(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c1, c2 := dial(t, b), dial(t, b)
	r := root(t, c1)
	mustWrite(t, c1, r+"/x", "0")
	tx1, err := c1.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tx2, err := c2.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i, tx := range []*xenstore.Tx{tx1, tx2} {
		if _, err := tx.Read(ctx, r+"/x"); err != nil {
			t.Fatal(err)
		}
		mustWrite(t, tx, r+"/x", fmt.Sprint(i+1))
	}
	if err := tx1.Commit(ctx); err != nil {
		t.Fatalf("first commit: %v", err)
	}
	if err := tx2.Commit(ctx); !errors.Is(err, unix.EAGAIN) {
		t.Fatalf("second, conflicting commit: got %v, want EAGAIN", err)
	}
	if err := tx2.Abort(ctx); err != nil {
		t.Errorf("Abort after a failed commit: %v", err)
	}
	if got, _ := c1.Read(ctx, r+"/x"); got != "1" {
		t.Errorf("after the conflict x = %q, want the first commit's 1", got)
	}
}

func testTransactionRetry(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c1, c2 := dial(t, b), dial(t, b)
	r := root(t, c1)
	mustWrite(t, c1, r+"/n", "0")
	attempts := 0
	err := c1.Transaction(ctx, func(tx *xenstore.Tx) error {
		attempts++
		v, err := tx.Read(ctx, r+"/n")
		if err != nil {
			return err
		}
		if attempts == 1 { // a concurrent writer makes the first commit conflict
			mustWrite(t, c2, r+"/n", "10")
		}
		return tx.Write(ctx, r+"/n", v+"+1")
	})
	if err != nil {
		t.Fatal(err)
	}
	if attempts != 2 {
		t.Errorf("attempts = %d, want 2 (one conflict, one success)", attempts)
	}
	if got, _ := c1.Read(ctx, r+"/n"); got != "10+1" {
		t.Errorf("n = %q, want 10+1", got)
	}
	// An error from fn aborts and is returned as is.
	errStop := errors.New("stop")
	err = c1.Transaction(ctx, func(tx *xenstore.Tx) error {
		mustWrite(t, tx, r+"/aborted", "1")
		return errStop
	})
	if !errors.Is(err, errStop) {
		t.Errorf("Transaction returned %v, want fn's error", err)
	}
	if _, err := c1.Read(ctx, r+"/aborted"); !errors.Is(err, unix.ENOENT) {
		t.Errorf("write of an aborted transaction is visible: %v", err)
	}
}

func testTransactionView(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c := dial(t, b)
	r := root(t, c)
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, tx, r+"/a", "1")
	if got, err := tx.Read(ctx, r+"/a"); err != nil || got != "1" {
		t.Errorf("read own write in tx = %q, %v", got, err)
	}
	if _, err := c.Read(ctx, r+"/a"); !errors.Is(err, unix.ENOENT) {
		t.Errorf("uncommitted write visible outside the transaction: %v", err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := c.Read(ctx, r+"/a"); err != nil || got != "1" {
		t.Errorf("committed write = %q, %v", got, err)
	}
	if err := tx.Commit(ctx); !errors.Is(err, unix.EINVAL) {
		t.Errorf("second Commit: got %v, want EINVAL", err)
	}
}

// next receives the next event or fails the test (the bound only turns a
// missing event into a failure instead of a hang).
func next(t *testing.T, w *xenstore.Watch) xenstore.Event {
	t.Helper()
	select {
	case ev, ok := <-w.Events():
		if !ok {
			t.Fatal("watch channel closed")
		}
		return ev
	case <-time.After(30 * time.Second):
		t.Fatal("no watch event")
		return xenstore.Event{}
	}
}

func expectEvents(t *testing.T, w *xenstore.Watch, want ...xenstore.Event) {
	t.Helper()
	for _, ev := range want {
		if got := next(t, w); got != ev {
			t.Fatalf("event = %+v, want %+v", got, ev)
		}
	}
}

func testWatchEvents(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c, other := dial(t, b), dial(t, b)
	r := root(t, c)
	mustWrite(t, c, r+"/w/old", "x")
	w, err := c.Watch(ctx, r+"/w", "tok")
	if err != nil {
		t.Fatal(err)
	}
	ev := func(p string) xenstore.Event { return xenstore.Event{Path: p, Token: "tok"} }
	// Initial event once, then one per change, in order, incl. subtree
	// changes and changes made by another connection. The sentinel write
	// proves no duplicate came before it.
	expectEvents(t, w, ev(r+"/w"))
	mustWrite(t, other, r+"/w", "1")
	expectEvents(t, w, ev(r+"/w"))
	mustWrite(t, c, r+"/w/a/b", "2")
	expectEvents(t, w, ev(r+"/w/a/b"))
	if err := c.Rm(ctx, r+"/w/old"); err != nil {
		t.Fatal(err)
	}
	expectEvents(t, w, ev(r+"/w/old"))
	mustWrite(t, c, r+"/unwatched", "x")
	mustWrite(t, c, r+"/w/sentinel", "x")
	expectEvents(t, w, ev(r+"/w/sentinel"))

	// A transaction's changes fire at commit.
	if err := c.Transaction(ctx, func(tx *xenstore.Tx) error { return tx.Write(ctx, r+"/w/tx", "1") }); err != nil {
		t.Fatal(err)
	}
	expectEvents(t, w, ev(r+"/w/tx"))

	// Same token on two watches: each event reaches only its own watch.
	w2, err := c.Watch(ctx, r+"/v", "tok")
	if err != nil {
		t.Fatal(err)
	}
	expectEvents(t, w2, ev(r+"/v"))
	mustWrite(t, c, r+"/v", "1")
	mustWrite(t, c, r+"/w/sentinel2", "1")
	expectEvents(t, w2, ev(r+"/v"))
	expectEvents(t, w, ev(r+"/w/sentinel2"))

	// Relative watches report relative paths.
	rel := "xbtest-rel/" + strings.ReplaceAll(t.Name(), "/", "-")
	t.Cleanup(func() { c.Rm(context.Background(), rel) })
	wr, err := c.Watch(ctx, rel, "rel")
	if err != nil {
		t.Fatal(err)
	}
	expectEvents(t, wr, xenstore.Event{Path: rel, Token: "rel"})
	mustWrite(t, c, "/local/domain/0/"+rel+"/x", "1")
	expectEvents(t, wr, xenstore.Event{Path: rel + "/x", Token: "rel"})

	if err := w.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := <-w.Events(); ok {
		t.Error("Events channel still open after Close")
	}
	// Registering the same path again works after Close (unwatch happened).
	w3, err := c.Watch(ctx, r+"/w", "tok")
	if err != nil {
		t.Fatal(err)
	}
	expectEvents(t, w3, ev(r+"/w"))
}

// testWatchEventBeforeReply: C xenstored sends the event a write triggers on
// the writer's own watch before the write's reply. The client must still
// match the reply, and have queued the event by the time Write returns.
func testWatchEventBeforeReply(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c := dial(t, b)
	r := root(t, c)
	w, err := c.Watch(ctx, r, "own")
	if err != nil {
		t.Fatal(err)
	}
	expectEvents(t, w, xenstore.Event{Path: r, Token: "own"})
	for i := range 20 {
		before := xenstore.EventsQueued(w)
		p := fmt.Sprintf("%s/k%d", r, i)
		mustWrite(t, c, p, "v")
		if b.eventsBeforeReply && xenstore.EventsQueued(w) == before {
			t.Fatalf("write %d returned before the event the peer sent ahead of the reply was queued", i)
		}
		expectEvents(t, w, xenstore.Event{Path: p, Token: "own"})
	}
}

// testPeerOrdering checks on the raw wire which order the peer uses, so the
// event-before-reply case above is known to be exercised.
func testPeerOrdering(t *testing.T, b *backend) {
	nc, err := net.Dial("unix", b.socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second)) // a hang becomes a failure
	send := func(typ, id uint32, payload string) {
		var h [16]byte
		binary.LittleEndian.PutUint32(h[0:], typ)
		binary.LittleEndian.PutUint32(h[4:], id)
		binary.LittleEndian.PutUint32(h[12:], uint32(len(payload)))
		if _, err := nc.Write(append(h[:], payload...)); err != nil {
			t.Fatal(err)
		}
	}
	recvType := func() uint32 {
		var h [16]byte
		if _, err := io.ReadFull(nc, h[:]); err != nil {
			t.Fatal(err)
		}
		if _, err := io.CopyN(io.Discard, nc, int64(binary.LittleEndian.Uint32(h[12:]))); err != nil {
			t.Fatal(err)
		}
		return binary.LittleEndian.Uint32(h[0:])
	}
	const watchType, writeType, eventType = 4, 11, 15
	p := "/xbtest/order-" + strings.ReplaceAll(t.Name(), "/", "-")
	send(watchType, 1, p+"\x00t\x00")
	if got := []uint32{recvType(), recvType()}; !slices.Equal(got, []uint32{watchType, eventType}) {
		t.Fatalf("XS_WATCH answered with types %v, want OK then the initial event", got)
	}
	send(writeType, 2, p+"\x00v")
	got := []uint32{recvType(), recvType()}
	want := []uint32{writeType, eventType}
	if b.eventsBeforeReply {
		want = []uint32{eventType, writeType}
	}
	if !slices.Equal(got, want) {
		t.Errorf("XS_WRITE triggering an own watch: message types %v, want %v", got, want)
	}
	c := dial(t, b)
	c.Rm(testCtx(t), p)
}

// testHammer: 64 goroutines share one connection (run with -race).
func testHammer(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c := dial(t, b)
	r := root(t, c)
	w, err := c.Watch(ctx, r, "hammer")
	if err != nil {
		t.Fatal(err)
	}
	go func() { // drain: the queue is unbounded, but keep memory flat
		for range w.Events() {
		}
	}()
	const workers, rounds = 64, 20
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for g := range workers {
		wg.Go(func() {
			p := fmt.Sprintf("%s/g%d", r, g)
			for i := range rounds {
				v := fmt.Sprint(i)
				if err := c.Write(ctx, p+"/v", v); err != nil {
					errs <- err
					return
				}
				got, err := c.Read(ctx, p+"/v")
				if err != nil || got != v {
					errs <- fmt.Errorf("goroutine %d read %q, %v; want %q", g, got, err, v)
					return
				}
				if i%5 == 0 {
					err := c.Transaction(ctx, func(tx *xenstore.Tx) error {
						return tx.Write(ctx, p+"/tx", v)
					})
					if err != nil {
						errs <- err
						return
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	names, err := c.Directory(ctx, r)
	if err != nil || len(names) != workers {
		t.Errorf("Directory after hammer: %d names, %v; want %d", len(names), err, workers)
	}
	w.Close(ctx)
}

func testPayloadLimit(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c := dial(t, b)
	r := root(t, c)
	p := r + "/big"
	fits := strings.Repeat("v", xenstore.MaxPayload-len(p)-1) // path\0value = 4096
	// The client sends it; oxenstored refuses values above its quota-maxsize
	// (2048 bytes, enforced for dom0 too) with E2BIG.
	switch err := c.Write(ctx, p, fits); {
	case errors.Is(err, unix.E2BIG):
		t.Logf("peer refuses a %d-byte value: %v", len(fits), err)
	case err != nil:
		t.Fatalf("write of exactly %d payload bytes: %v", xenstore.MaxPayload, err)
	default:
		if got, err := c.Read(ctx, p); err != nil || got != fits {
			t.Errorf("read back %d bytes, %v; want %d", len(got), err, len(fits))
		}
	}
	err := c.Write(ctx, p, fits+"v")
	if !errors.Is(err, xenstore.ErrTooLarge) {
		t.Fatalf("write of %d payload bytes: got %v, want ErrTooLarge", xenstore.MaxPayload+1, err)
	}
	if !strings.Contains(err.Error(), "4097 bytes") {
		t.Errorf("error %q does not say the size", err)
	}
	if _, err := c.Read(ctx, "/local/domain/0"); err != nil { // nothing was sent: the connection is fine
		t.Errorf("read after a refused write: %v", err)
	}
}

// inFlight waits until c has n requests waiting for a reply.
func inFlight(t *testing.T, c *xenstore.Client, n int) {
	t.Helper()
	ctx := testCtx(t)
	for xenstore.PendingRequests(c) != n {
		if ctx.Err() != nil {
			t.Fatal("request never went in flight")
		}
		time.Sleep(time.Millisecond)
	}
}

func testCancel(t *testing.T, b *backend) {
	c := dial(t, b)
	r := root(t, c)
	mustWrite(t, c, r+"/k", "v")
	b.freeze(t)
	thawed := false
	t.Cleanup(func() {
		if !thawed {
			b.thaw(t)
		}
	})
	ctx, cancel := context.WithCancel(testCtx(t))
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(ctx, r+"/k")
		done <- err
	}()
	inFlight(t, c, 1)
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled Read: got %v, want context.Canceled", err)
	}
	if n := xenstore.PendingRequests(c); n != 0 {
		t.Errorf("%d requests still pending after cancel", n)
	}
	b.thaw(t)
	thawed = true
	// The late reply of the abandoned request is dropped; the next call works.
	if got, err := c.Read(testCtx(t), r+"/k"); err != nil || got != "v" {
		t.Errorf("Read after a cancelled one = %q, %v", got, err)
	}
}

func testClose(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c, err := xenstore.DialUnix(ctx, b.socket)
	if err != nil {
		t.Fatal(err)
	}
	w, err := c.Watch(ctx, "/xbtest", "close")
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	for range w.Events() { // the initial event may or may not be delivered
	}
	if _, err := c.Read(ctx, "/"); !errors.Is(err, xenstore.ErrClosed) {
		t.Errorf("Read after Close: got %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func testKillRestart(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c := dial(t, b)
	w, err := c.Watch(ctx, "xbtest-kr", "kr")
	if err != nil {
		t.Fatal(err)
	}
	initial := xenstore.Event{Path: "xbtest-kr", Token: "kr"}
	expectEvents(t, w, initial)
	tx, err := c.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// Kill the peer while a request is in flight: it fails, it does not hang.
	b.freeze(t)
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(ctx, "/local/domain/0/name")
		done <- err
	}()
	inFlight(t, c, 1)
	b.kill(t)
	if err := <-done; !errors.Is(err, xenstore.ErrConnectionLost) {
		t.Fatalf("in-flight Read when the peer died: got %v, want ErrConnectionLost", err)
	}
	// While it is down, calls fail at once (the dial is refused).
	if err := c.Write(ctx, "xbtest-kr/x", "1"); err == nil {
		t.Fatal("Write with the peer down succeeded")
	}

	b.restart(t)
	// The next call reconnects; the watch is re-registered and fires again.
	if err := c.Write(ctx, "xbtest-kr/x", "1"); err != nil {
		t.Fatalf("Write after restart: %v", err)
	}
	expectEvents(t, w, initial, xenstore.Event{Path: "xbtest-kr/x", Token: "kr"})
	// A transaction of the old connection is gone.
	if err := tx.Write(ctx, "xbtest-kr/tx", "1"); !errors.Is(err, xenstore.ErrConnectionLost) {
		t.Errorf("write in a transaction of the dead connection: got %v, want ErrConnectionLost", err)
	}
}

// testIdleRedial: a client that only watches (no calls) notices at once that
// the peer died, redials in the background until the peer is back, and
// re-registers its watch, whose initial event fires again, all without a call.
func testIdleRedial(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c := dial(t, b)
	type change struct {
		up  bool
		err error
	}
	changes := make(chan change, 10)
	c.OnConnection(func(up bool, err error) { changes <- change{up, err} })
	w, err := c.Watch(ctx, "xbtest-idle", "idle")
	if err != nil {
		t.Fatal(err)
	}
	initial := xenstore.Event{Path: "xbtest-idle", Token: "idle"}
	expectEvents(t, w, initial)

	killed := time.Now()
	b.kill(t)
	select {
	case ch := <-changes:
		if ch.up || !errors.Is(ch.err, xenstore.ErrConnectionLost) {
			t.Fatalf("first change after the kill: %+v, want down with ErrConnectionLost", ch)
		}
		t.Logf("loss noticed after %v", time.Since(killed))
	case <-time.After(time.Second):
		t.Fatal("an idle client did not notice the lost connection within 1 s")
	}
	if c.Connected() {
		t.Error("Connected() = true with the peer dead")
	}
	time.Sleep(300 * time.Millisecond) // a few failed redials
	restarted := time.Now()
	b.restart(t)
	select {
	case ch := <-changes:
		if !ch.up {
			t.Fatalf("change after the restart: %+v, want up", ch)
		}
		t.Logf("redialled %v after the restart", time.Since(restarted))
	case <-time.After(5 * time.Second):
		t.Fatal("no background redial within 5 s of the restart")
	}
	if !c.Connected() {
		t.Error("Connected() = false after the redial")
	}
	expectEvents(t, w, initial) // re-registered, with no call made
}

// TestDialEnv: Dial follows XENSTORED_PATH.
func TestDialEnv(t *testing.T) {
	b := fakeBackend(t, false)
	t.Setenv("XENSTORED_PATH", b.socket)
	c, err := xenstore.Dial(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := c.Read(testCtx(t), "/local/domain/0"); err != nil || got != "" {
		t.Errorf("Read = %q, %v", got, err)
	}
}

// testLargeDirectory lists a directory whose names do not fit one 4096-byte
// reply (backend/vbd of a host with ~1,000 domains): the client must fall
// back to XS_DIRECTORY_PART, outside and inside a transaction.
func testLargeDirectory(t *testing.T, b *backend) {
	ctx := testCtx(t)
	c := dial(t, b)
	r := root(t, c)
	var want []string
	err := c.Transaction(ctx, func(tx *xenstore.Tx) error {
		want = want[:0]
		for i := range 1200 {
			name := strconv.Itoa(100000 + i)
			want = append(want, name)
			if err := tx.Write(ctx, r+"/"+name+"/state", "4"); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Directory(ctx, r)
	slices.Sort(got)
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("Directory(%s): %d names, err %v; want %d names", r, len(got), err, len(want))
	}
	err = c.Transaction(ctx, func(tx *xenstore.Tx) error {
		got, err := tx.Directory(ctx, r)
		if err != nil {
			return err
		}
		if len(got) != len(want) {
			t.Errorf("Tx.Directory(%s): %d names, want %d", r, len(got), len(want))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
