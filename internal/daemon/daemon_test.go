package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/model"
	"xenblkd/internal/model/modeltest"
	"xenblkd/internal/server"
	"xenblkd/internal/xenstore"
	"xenblkd/internal/xenstore/xenstoretest"
)

// discard is a logger for tests that do not care.
var discard = slog.New(slog.DiscardHandler)

// fakeMachine is the fake machine of the daemon's tests (model/modeltest),
// with recovery's and adoption's ways to its devices (Loops).
type fakeMachine struct{ *modeltest.Host }

// newHost returns a fake machine whose loop devices are /dev/loop1001,
// /dev/loop1002, ... (numbers no real test device has).
func newHost() *fakeMachine { return &fakeMachine{&modeltest.Host{First: 1000}} }

func (h *fakeMachine) Reopen(number int, diskseq uint64) (HeldLoop, error) {
	d, err := h.Host.Reopen(number, diskseq)
	if err != nil {
		return nil, err
	}
	return d, nil
}

func (h *fakeMachine) Claim(number int, file model.FileID) (HeldLoop, error) {
	d, err := h.Host.Claim(number, file)
	if err != nil {
		return nil, err
	}
	return d, nil
}

type env struct {
	xs     *xenstore.Client
	host   *fakeMachine
	socket string
	dir    string
	d      *Daemon
}

// dialTestStore starts an in-memory XenStore for the test and connects to it.
func dialTestStore(t *testing.T, opts xenstoretest.Options) *xenstore.Client {
	t.Helper()
	srv := xenstoretest.NewServer(t, opts)
	xs, err := xenstore.DialUnix(context.Background(), srv.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { xs.Close() })
	return xs
}

// testImage writes a small image file for the test.
func testImage(t *testing.T) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(img, []byte("image"), 0o644); err != nil {
		t.Fatal(err)
	}
	return img
}

// newEnv makes a daemon on a fake XenStore and fake loop devices, and the
// listener of its API socket; the caller serves it.
func newEnv(t *testing.T) (*env, *net.UnixListener) {
	t.Helper()
	xs := dialTestStore(t, xenstoretest.Options{})
	dir, err := os.MkdirTemp("", "xenblkd-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e := &env{xs: xs, host: newHost(), socket: filepath.Join(dir, "api.sock"), dir: dir}
	l, err := server.Listen(e.socket)
	if err != nil {
		t.Fatal(err)
	}
	e.d = New(discard, hotplug.ClientStore{Client: xs}, e.host)
	return e, l
}

// serve runs each function until the test ends.
func serve(t *testing.T, fns ...func(ctx context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, len(fns))
	for _, fn := range fns {
		go func() { done <- fn(ctx) }()
	}
	t.Cleanup(func() {
		cancel()
		for range fns {
			<-done
		}
	})
}

func start(t *testing.T) *env {
	t.Helper()
	e, l := newEnv(t)
	serve(t, func(ctx context.Context) error { return server.Serve(ctx, l, e.d, discard) })
	return e
}

func (e *env) backend(t *testing.T, domid, devid int, params, mode string) string {
	t.Helper()
	be := fmt.Sprintf("backend/vbd/%d/%d", domid, devid)
	for k, v := range map[string]string{"params": params, "mode": mode, "state": "2"} {
		if v == "-" {
			continue
		}
		if err := e.xs.Write(context.Background(), be+"/"+k, v); err != nil {
			t.Fatal(err)
		}
	}
	return be
}

func (e *env) read(t *testing.T, path string) (string, bool) {
	t.Helper()
	v, err := e.xs.Read(context.Background(), path)
	if errors.Is(err, unix.ENOENT) {
		return "", false
	}
	if err != nil {
		t.Fatal(err)
	}
	return v, true
}

func TestAddRemove(t *testing.T) {
	e := start(t)
	img := testImage(t)
	be := e.backend(t, 1, 51712, img, "w")
	ctx := context.Background()
	resp, err := api.Call(ctx, e.socket, api.Request{Op: "add", Path: be})
	if err != nil || !resp.OK {
		t.Fatalf("add: %+v, %v", resp, err)
	}
	for node, want := range map[string]string{
		"physical-device": "7:3e9", "physical-device-path": "/dev/loop1001", "diskseq": "65", "hotplug-status": "connected",
	} {
		if got, _ := e.read(t, be+"/"+node); got != want {
			t.Errorf("%s = %q, want %q", node, got, want)
		}
	}
	// Called twice: nothing new.
	if resp, err := api.Call(ctx, e.socket, api.Request{Op: "add", Path: be}); err != nil || !resp.OK || e.host.Open() != 1 {
		t.Fatalf("second add: %+v, %v, %d devices", resp, err, e.host.Open())
	}
	st, err := api.Call(ctx, e.socket, api.Request{Op: "status"})
	if err != nil || len(st.Attachments) != 1 || st.Attachments[0].Device != "/dev/loop1001" {
		t.Fatalf("status: %+v, %v", st, err)
	}
	for i := 0; i < 2; i++ {
		if resp, err := api.Call(ctx, e.socket, api.Request{Op: "remove", Path: be}); err != nil || !resp.OK {
			t.Fatalf("remove %d: %+v, %v", i, resp, err)
		}
	}
	if _, ok := e.read(t, be+"/physical-device"); ok || e.host.Open() != 0 {
		t.Fatalf("after remove: physical-device still there or %d devices open", e.host.Open())
	}
}

func TestBadInput(t *testing.T) {
	e := start(t)
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	roFile := filepath.Join(dir, "ro")
	if err := os.WriteFile(roFile, []byte("x"), 0o444); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, params, mode, want string
	}{
		{"missing params", "-", "w", "params is missing"},
		{"empty params", "", "w", "params is empty"},
		{"relative no such node", "nosuchdisk-xenblkd", "w", "no such device /dev/nosuchdisk-xenblkd"},
		{"nonexistent", "/nonexistent/img", "w", "no such file or device"},
		{"directory", dir, "w", "is a directory"},
		{"fifo", fifo, "w", "is a FIFO"},
		{"character device", "/dev/null", "w", "is a character device"},
		{"read-only file", roFile, "w", "the file is read-only"},
		{"unknown mode", roFile, "x", `unknown mode "x"`},
		{"oversized params", "/" + strings.Repeat("a", 2000), "w", "the limit is 1024"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			be := e.backend(t, 2, 51712+i, tt.params, tt.mode)
			resp, err := api.Call(context.Background(), e.socket, api.Request{Op: "add", Path: be})
			if err != nil || resp.OK || !resp.ErrorRecorded || !strings.Contains(resp.Error, tt.want) {
				t.Fatalf("add: %+v, %v; want an error containing %q", resp, err, tt.want)
			}
			if got, _ := e.read(t, be+"/hotplug-error"); got != resp.Error {
				t.Errorf("hotplug-error = %q, want %q", got, resp.Error)
			}
			if _, ok := e.read(t, be+"/physical-device"); ok {
				t.Error("physical-device written on failure")
			}
		})
	}
	if e.host.Open() != 0 {
		t.Errorf("%d devices left", e.host.Open())
	}
}

func TestMounts(t *testing.T) {
	mi := filepath.Join(t.TempDir(), "mountinfo")
	os.WriteFile(mi, []byte("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"+
		"30 22 7:5 / /mnt/x\\040y ro,noatime - ext4 /dev/loop5 ro\n"+
		"31 22 7:5 / /srv rw - ext4 /dev/loop5 rw\n"), 0o644)
	tests := []struct {
		devs []uint64
		want string
	}{
		{[]uint64{unix.Mkdev(8, 1)}, "[{2049 /dev/sda1 / false}]"},
		{[]uint64{unix.Mkdev(7, 5), unix.Mkdev(7, 6)}, "[{1797 /dev/loop5 /mnt/x y true} {1797 /dev/loop5 /srv false}]"},
		{[]uint64{unix.Mkdev(7, 6)}, "[]"},
	}
	for _, tt := range tests {
		got, err := mounts(mi, tt.devs)
		if err != nil || fmt.Sprint(got) != tt.want {
			t.Errorf("mounts(%x) = %v, %v; want %s", tt.devs, got, err, tt.want)
		}
	}
}

// TestBlockFacts reads partitions and whole disks from a sysfs laid out as
// the kernel does: /sys/dev/block/M:m links to the device's directory, a
// partition's directory sits inside its disk's and has a "partition" file.
func TestBlockFacts(t *testing.T) {
	sys := t.TempDir()
	disk := filepath.Join(sys, "devices/pci0/block/sdb")
	for _, p := range []struct{ dir, dev string }{{disk, "8:16"}, {disk + "/sdb1", "8:17"}, {disk + "/sdb2", "8:18"}, {disk + "/holders", ""}} {
		os.MkdirAll(p.dir, 0o755)
		if p.dev != "" {
			os.WriteFile(p.dir+"/dev", []byte(p.dev+"\n"), 0o644)
		}
	}
	os.WriteFile(disk+"/sdb1/partition", []byte("1\n"), 0o644)
	os.WriteFile(disk+"/sdb2/partition", []byte("2\n"), 0o644)
	os.MkdirAll(sys+"/dev/block", 0o755)
	os.Symlink(disk, sys+"/dev/block/8:16")
	os.Symlink(disk+"/sdb1", sys+"/dev/block/8:17")

	whole := model.Target{Kind: model.BlockDevice, Path: "/dev/sdb", Rdev: unix.Mkdev(8, 16)}
	if err := blockFacts(nil, &whole, sys); err != nil {
		t.Fatal(err)
	}
	if want := []uint64{unix.Mkdev(8, 17), unix.Mkdev(8, 18)}; fmt.Sprint(whole.Partitions) != fmt.Sprint(want) || whole.Whole != 0 {
		t.Errorf("whole disk: partitions %v, whole %x; want %v, 0", whole.Partitions, whole.Whole, want)
	}
	part := model.Target{Kind: model.BlockDevice, Path: "/dev/sdb1", Rdev: unix.Mkdev(8, 17)}
	if err := blockFacts(nil, &part, sys); err != nil {
		t.Fatal(err)
	}
	if part.Whole != unix.Mkdev(8, 16) || part.Partitions != nil {
		t.Errorf("partition: whole %x, partitions %v; want %x, none", part.Whole, part.Partitions, unix.Mkdev(8, 16))
	}
}

// TestRequestsPerAddRemove pins what an exec'd add and remove cost in
// XenStore requests without pre-setup (docs/architecture.md lists them): the
// add's snapshot (4 reads) and its log line's labels (2 reads, beside it,
// then cached) outside any transaction, and Connect (one transaction, whose
// batch of 2 checks and 4 writes goes to the transaction); the remove of a
// disk attached here: its 2 removals, nothing read.
func TestRequestsPerAddRemove(t *testing.T) {
	xs := dialTestStore(t, xenstoretest.Options{})
	store := &countingStore{Store: hotplug.ClientStore{Client: xs}}
	d := New(slog.New(slog.NewTextHandler(io.Discard, nil)), store, newHost()) // info: lines with labels
	img := testImage(t)
	b := libxlBackend(t, xs, 5, 51712, ourScript, img, "w")
	ctx := context.Background()
	if resp := d.Handle(ctx, api.Request{Op: api.OpAdd, Path: b.Path()}); !resp.OK {
		t.Fatalf("add: %+v", resp)
	}
	count := func() (requests, transactions int) {
		store.mu.Lock()
		requests = store.requests
		store.mu.Unlock()
		_, transactions = store.ops(b.Path())
		return requests, transactions
	}
	if reqs, txs := count(); reqs != 6 || txs != 1 {
		t.Errorf("add: %d requests outside transactions, %d transactions; want 6 (4 + 2), 1", reqs, txs)
	}
	if resp := d.Handle(ctx, api.Request{Op: api.OpRemove, Path: b.Path()}); !resp.OK {
		t.Fatalf("remove: %+v", resp)
	}
	if reqs, txs := count(); reqs != 2 || txs != 0 {
		t.Errorf("remove: %d requests, %d transactions; want 2, 0", reqs, txs)
	}
}

// TestSharingThroughDaemon: the sharing rules, through the API and the fake
// machine: a writable image is refused to a second domain and to anyone
// while someone else's loop device is bound to it; read-only users share one
// device; a device whose identity changed under us is not freed.
func TestSharingThroughDaemon(t *testing.T) {
	e := start(t)
	ctx := context.Background()
	img := testImage(t)
	call := func(op, be string) api.Response {
		t.Helper()
		resp, err := api.Call(ctx, e.socket, api.Request{Op: op, Path: be})
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	a := e.backend(t, 1, 51712, img, "w")
	if resp := call("add", a); !resp.OK {
		t.Fatalf("add A: %+v", resp)
	}
	b := e.backend(t, 2, 51712, img, "w")
	if resp := call("add", b); resp.OK || !strings.Contains(resp.Error, "domain 1 device 51712 (xvda) already uses it read-write") {
		t.Fatalf("add B: %+v; want the conflict with A", resp)
	}
	if got, _ := e.read(t, b+"/hotplug-error"); !strings.Contains(got, "already uses it read-write") {
		t.Errorf("B's hotplug-error = %q", got)
	}
	call("remove", a)

	var st unix.Stat_t
	if err := unix.Stat(img, &st); err != nil {
		t.Fatal(err)
	}
	file := model.FileID{Dev: st.Dev, Ino: st.Ino}
	e.host.Bind(file, model.Binding{Path: "/dev/loop1500", Rdev: unix.Mkdev(7, 1500), DiskSeq: 9, Tag: img})
	if resp := call("add", b); resp.OK || !strings.Contains(resp.Error, "loop device /dev/loop1500 (not made by xenblkd") {
		t.Fatalf("add B beside someone else's device: %+v; want refused", resp)
	}
	e.host.Unbind()

	made := e.host.Made()
	for dom := 3; dom <= 5; dom++ {
		if resp := call("add", e.backend(t, dom, 51712, img, "r")); !resp.OK {
			t.Fatalf("read-only add in domain %d: %+v", dom, resp)
		}
	}
	if got := e.host.Made() - made; got != 1 {
		t.Errorf("3 read-only users made %d devices, want 1", got)
	}
	attached, _ := e.d.model.Lookup(model.Key{Domid: 3, Devid: 51712})
	e.host.Reuse(attached.DevPath)
	for dom := 3; dom <= 5; dom++ {
		call("remove", fmt.Sprintf("backend/vbd/%d/51712", dom))
	}
	if e.host.Open() != 1 {
		t.Errorf("%d devices open after the last user of a reused device went; want it left alone (1)", e.host.Open())
	}
}
