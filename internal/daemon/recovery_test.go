package daemon

import (
	"context"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/model"
	"xenblkd/internal/xenstore"
	"xenblkd/internal/xenstore/xenstoretest"
)

// recoveryEnv is a XenStore and a fake machine that outlive one daemon: a
// restart is a new daemon on both.
type recoveryEnv struct {
	xs   *xenstore.Client
	host *fakeMachine
	img  string
}

func newRecoveryEnv(t *testing.T) *recoveryEnv {
	t.Helper()
	xs := dialTestStore(t, xenstoretest.Options{})
	img := testImage(t)
	return &recoveryEnv{xs: xs, host: newHost(), img: img}
}

func (r *recoveryEnv) daemon() *Daemon {
	return New(discard, hotplug.ClientStore{Client: r.xs}, r.host)
}

func (r *recoveryEnv) node(t *testing.T, b hotplug.Backend, name string) (string, bool) {
	t.Helper()
	v, err := r.xs.Read(context.Background(), b.Path()+"/"+name)
	if err != nil {
		return "", false
	}
	return v, true
}

// TestRecoverRestores: a restarted daemon (no fd store) re-opens the device
// XenStore names by number and diskseq, and holds the backend again.
func TestRecoverRestores(t *testing.T) {
	r := newRecoveryEnv(t)
	b := libxlBackend(t, r.xs, 3, 51712, ourScript, r.img, "w")
	ctx := context.Background()
	if resp := r.daemon().Handle(ctx, api.Request{Op: api.OpAdd, Path: b.Path()}); !resp.OK {
		t.Fatalf("add: %+v", resp)
	}
	d := r.daemon()
	sum, err := d.Recover(ctx, RecoverOptions{})
	if err != nil || sum.Restored != 1 || sum.Reopened != 1 || sum.Mismatched != 0 {
		t.Fatalf("Recover: %+v, %v; want 1 restored, 1 re-opened", sum, err)
	}
	if _, ok := d.model.Lookup(keyOf(b)); !ok {
		t.Fatal("the backend is not held after recovery")
	}
	if rec := d.backends.Get(keyOf(b)); !rec.Attached {
		t.Errorf("record after recovery: %+v, want attached", rec)
	}
	if resp := d.Handle(ctx, api.Request{Op: api.OpRemove, Path: b.Path()}); !resp.OK || r.host.Open() != 0 {
		t.Fatalf("remove after recovery: %+v, %d devices open; want ok, 0", resp, r.host.Open())
	}
}

// TestRecoverMismatch: a device reused while the daemon was down is not
// taken back: physical-device goes, hotplug-error says why, the device is
// left alone.
func TestRecoverMismatch(t *testing.T) {
	r := newRecoveryEnv(t)
	b := libxlBackend(t, r.xs, 3, 51712, ourScript, r.img, "w")
	ctx := context.Background()
	resp := r.daemon().Handle(ctx, api.Request{Op: api.OpAdd, Path: b.Path()})
	if !resp.OK {
		t.Fatalf("add: %+v", resp)
	}
	r.host.Reuse(resp.Attachment.Device)
	d := r.daemon()
	sum, err := d.Recover(ctx, RecoverOptions{})
	if err != nil || sum.Restored != 0 || sum.Mismatched != 1 {
		t.Fatalf("Recover: %+v, %v; want 1 mismatched", sum, err)
	}
	if _, ok := r.node(t, b, "physical-device"); ok {
		t.Error("physical-device left naming a reused device")
	}
	if msg, _ := r.node(t, b, "hotplug-error"); !strings.Contains(msg, "no longer bound to") {
		t.Errorf("hotplug-error = %q", msg)
	}
	if rec := d.backends.Get(keyOf(b)); rec.Attached {
		t.Errorf("record after a mismatch: %+v, want nothing attached", rec)
	}
}

// TestRecoverAdoptsStock: the stock script's device (no diskseq node, its
// node named) is claimed, its diskseq recorded, and the backend held; a
// device that does not check out is left alone.
func TestRecoverAdoptsStock(t *testing.T) {
	r := newRecoveryEnv(t)
	var st unix.Stat_t
	if err := unix.Stat(r.img, &st); err != nil {
		t.Fatal(err)
	}
	file := model.FileID{Dev: st.Dev, Ino: st.Ino}
	r.host.Bind(file, model.Binding{Path: "/dev/loop1600", Rdev: unix.Mkdev(7, 1600), DiskSeq: 77, Tag: r.img})
	b := libxlBackend(t, r.xs, 3, 51712, ourScript, r.img, "w",
		"physical-device", "7:640", "node", "/dev/loop1600", "hotplug-status", "connected")
	wrong := libxlBackend(t, r.xs, 4, 51712, ourScript, r.img, "w",
		"physical-device", "7:641", "node", "/dev/loop1601", "hotplug-status", "connected")
	d := r.daemon()
	sum, err := d.Recover(context.Background(), RecoverOptions{})
	if err != nil || sum.Stock != 1 || sum.Restored != 1 || sum.Foreign != 1 {
		t.Fatalf("Recover: %+v, %v; want 1 stock device adopted, 1 left alone", sum, err)
	}
	if seq, _ := r.node(t, b, "diskseq"); seq != hotplug.FormatDiskSeq(77) {
		t.Errorf("diskseq = %q, want %s", seq, hotplug.FormatDiskSeq(77))
	}
	if _, ok := d.model.Lookup(keyOf(b)); !ok {
		t.Error("the adopted backend is not held")
	}
	if _, ok := d.model.Lookup(keyOf(wrong)); ok {
		t.Error("a device that does not check out was taken over")
	}
	if pd, _ := r.node(t, wrong, "physical-device"); pd != "7:641" {
		t.Errorf("the other backend's physical-device = %q, want it left alone", pd)
	}
}
