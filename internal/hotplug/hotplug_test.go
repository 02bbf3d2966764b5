package hotplug

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"xenblkd/internal/xenstore"
)

// mapStore is an in-memory Store: a flat map of node → value. A directory
// exists if it is a key itself. Transactions apply to a copy, committed at the end.
type mapStore map[string]string

func (m mapStore) Read(ctx context.Context, p string) (string, error) {
	if v, ok := m[p]; ok {
		return v, nil
	}
	return "", &xenstore.Error{Op: "read", Path: p, Err: unix.ENOENT}
}
func (m mapStore) Write(ctx context.Context, p, v string) error { m[p] = v; return nil }
func (m mapStore) Mkdir(ctx context.Context, p string) error    { m[p] = ""; return nil }
func (m mapStore) Rm(ctx context.Context, p string) error {
	for k := range m {
		if k == p || strings.HasPrefix(k, p+"/") {
			delete(m, k)
		}
	}
	return nil
}
func (m mapStore) Directory(ctx context.Context, p string) ([]string, error) {
	seen := map[string]bool{}
	var names []string
	for k := range m {
		if rest, ok := strings.CutPrefix(k, p+"/"); ok && !strings.Contains(rest, permsSuffix) {
			name, _, _ := strings.Cut(rest, "/")
			if !seen[name] {
				seen[name] = true
				names = append(names, name)
			}
		}
	}
	if _, ok := m[p]; !ok && len(names) == 0 {
		return nil, &xenstore.Error{Op: "directory", Path: p, Err: unix.ENOENT}
	}
	return names, nil
}

// GetPerms returns the permissions stored under p+permsSuffix ("n0 r5"),
// else the toolstack's "n0" for every node that exists.
func (m mapStore) GetPerms(ctx context.Context, p string) ([]xenstore.Perm, error) {
	if _, ok := m[p]; !ok {
		return nil, &xenstore.Error{Op: "get-perms", Path: p, Err: unix.ENOENT}
	}
	spec, ok := m[p+permsSuffix]
	if !ok {
		spec = "n0"
	}
	if spec == "EACCES" {
		return nil, &xenstore.Error{Op: "get-perms", Path: p, Err: unix.EACCES}
	}
	var perms []xenstore.Perm
	for _, f := range strings.Fields(spec) {
		n, _ := strconv.ParseUint(f[1:], 10, 32)
		perms = append(perms, xenstore.Perm{Domid: uint32(n), Access: f[0]})
	}
	return perms, nil
}

const permsSuffix = "\x00perms"

func (m mapStore) SetPerms(ctx context.Context, p string, perms []xenstore.Perm) error { return nil }
func (m mapStore) Batch(ctx context.Context, ops []xenstore.Op) []xenstore.Reply {
	return batchOn(ctx, m, ops)
}

// batchOn runs ops one after the other on o, as xenstored does a batch.
func batchOn(ctx context.Context, o xenstore.Ops, ops []xenstore.Op) []xenstore.Reply {
	out := make([]xenstore.Reply, len(ops))
	for i, op := range ops {
		r := &out[i]
		switch op.Type {
		case xenstore.OpRead:
			r.Value, r.Err = o.Read(ctx, op.Path)
		case xenstore.OpWrite:
			r.Err = o.Write(ctx, op.Path, op.Value)
		case xenstore.OpRm:
			r.Err = o.Rm(ctx, op.Path)
		case xenstore.OpDirectory:
			r.Names, r.Err = o.Directory(ctx, op.Path)
		case xenstore.OpGetPerms:
			r.Perms, r.Err = o.GetPerms(ctx, op.Path)
		}
	}
	return out
}

func (m mapStore) Transact(ctx context.Context, fn func(Batcher) error) error {
	tx := mapStore{}
	for k, v := range m {
		tx[k] = v
	}
	if err := fn(tx); err != nil {
		return err
	}
	for k := range m {
		delete(m, k)
	}
	for k, v := range tx {
		m[k] = v
	}
	return nil
}

func TestParseBackendPath(t *testing.T) {
	tests := []struct {
		in      string
		want    Backend
		wantErr bool
	}{
		{"backend/vbd/1/51712", Backend{1, 51712}, false},
		{"backend/vbd/0/768", Backend{0, 768}, false},
		{"", Backend{}, true},
		{"/local/domain/0/backend/vbd/1/51712", Backend{}, true},
		{"backend/vif/1/0", Backend{}, true},
		{"backend/vbd/1", Backend{}, true},
		{"backend/vbd/1/51712/x", Backend{}, true},
		{"backend/vbd/-1/51712", Backend{}, true},
		{"backend/vbd/01/51712", Backend{}, true},
		{"backend/vbd/1/0x10", Backend{}, true},
		{"backend/vbd/40000/1", Backend{}, true},
		{"backend/vbd/1/99999999999", Backend{}, true},
		{"backend/vbd/../51712", Backend{}, true},
	}
	for _, tt := range tests {
		got, err := ParseBackendPath(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("ParseBackendPath(%q) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
		if err != nil && !errors.Is(err, ErrBadPath) {
			t.Errorf("ParseBackendPath(%q): %v does not match ErrBadPath", tt.in, err)
		}
	}
}

func FuzzParseBackendPath(f *testing.F) {
	f.Add("backend/vbd/1/51712")
	f.Add("backend/vbd//")
	f.Fuzz(func(t *testing.T, s string) {
		b, err := ParseBackendPath(s)
		if err == nil && b.Path() != s {
			t.Fatalf("ParseBackendPath(%q) = %v, which formats as %q", s, b, b.Path())
		}
	})
}

var be = Backend{1, 51712}

func backendStore(params, mode string) mapStore {
	m := mapStore{be.Path(): "", be.node("state"): "2"}
	if params != "-" {
		m[be.node("params")] = params
	}
	if mode != "-" {
		m[be.node("mode")] = mode
	}
	return m
}

func TestReadRequest(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name, params, mode string
		wantErr            string
	}{
		{"ok", "/srv/img", "w", ""},
		{"missing params", "-", "w", "params is missing"},
		{"empty params", "", "w", "params is empty"},
		{"oversized params", strings.Repeat("a", 3000), "w", "params in backend/vbd/1/51712 is 3000 bytes long"},
		{"missing mode", "/srv/img", "-", "mode is missing"},
		{"oversized mode", "/srv/img", strings.Repeat("w", 100), "the limit is 8"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := ReadSnapshot(ctx, backendStore(tt.params, tt.mode), be, Params|Mode).Request()
			if tt.wantErr == "" {
				if err != nil || r.Params != tt.params || r.Mode != tt.mode {
					t.Fatalf("got %+v, %v", r, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("got %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestConnectFailDisconnect(t *testing.T) {
	ctx := context.Background()
	s := backendStore("/srv/img", "w")
	s[be.node("hotplug-error")] = "stale"
	s[be.node("dev")] = "xvda"
	s[fmt.Sprintf("/local/domain/%d/name", be.Domid)] = "guest1"
	req := Request{Params: "/srv/img", Mode: "w"}
	// Made for another disk than the directory now asks for (removed and
	// written again meanwhile): nothing written.
	for _, other := range []Request{{Params: "/srv/other", Mode: "w"}, {Params: "/srv/img", Mode: "r"}} {
		r := Result{Request: other, Rdev: unix.Mkdev(7, 300), DevPath: "/dev/loop300", DiskSeq: 0xab, ClearError: true}
		if _, err := Connect(ctx, s, be, r); !errors.Is(err, ErrBackendChanged) || s[be.node("hotplug-error")] != "stale" {
			t.Fatalf("connect a device made for %+v: got %v, nodes %v; want ErrBackendChanged, nothing written", other, err, s)
		}
		if _, ok := s[be.node("physical-device")]; ok {
			t.Fatalf("physical-device written for %+v", other)
		}
	}
	r := Result{Request: req, Rdev: unix.Mkdev(7, 300), DevPath: "/dev/loop300", DiskSeq: 0xab, ClearError: true}
	also, err := Connect(ctx, s, be, r, LabelOps(be)...)
	if err != nil {
		t.Fatal(err)
	}
	if lb := ParseLabels(also); lb != (Labels{Domain: "guest1", Vdev: "xvda"}) {
		t.Errorf("reads sent with Connect: %+v, want guest1/xvda", lb)
	}
	for node, want := range map[string]string{
		"physical-device": "7:12c", "physical-device-path": "/dev/loop300", "diskseq": "ab", "hotplug-status": "connected",
	} {
		if got := s[be.node(node)]; got != want {
			t.Errorf("%s = %q, want %q", node, got, want)
		}
	}
	if _, ok := s[be.node("hotplug-error")]; ok {
		t.Error("stale hotplug-error not removed")
	}
	// Same value again: fine. Another value: refused, nothing rewritten.
	if _, err := Connect(ctx, s, be, r); err != nil {
		t.Fatalf("reconnect same device: %v", err)
	}
	if _, err := Connect(ctx, s, be, Result{Request: req, Rdev: unix.Mkdev(7, 1), DevPath: "/dev/loop1"}); !errors.Is(err, ErrPhysicalDeviceSet) {
		t.Fatalf("connect another device: got %v, want ErrPhysicalDeviceSet", err)
	}
	if got := s[be.node("physical-device-path")]; got != "/dev/loop300" {
		t.Fatalf("physical-device-path rewritten to %q", got)
	}
	if err := Disconnect(ctx, s, be); err != nil {
		t.Fatalf("Disconnect: %v", err)
	}
	for _, node := range []string{"physical-device", "diskseq"} {
		if _, ok := s[be.node(node)]; ok {
			t.Errorf("%s left after Disconnect", node)
		}
	}
	if err := Fail(ctx, s, be, "boom"); err != nil || s[be.node("hotplug-error")] != "boom" || s[be.node("hotplug-status")] != "error" {
		t.Fatalf("Fail: %v, nodes %v", err, s)
	}

	gone := mapStore{}
	if _, err := Connect(ctx, gone, be, r); !errors.Is(err, ErrBackendGone) || len(gone) != 0 {
		t.Fatalf("connect to a removed backend: %v, wrote %v", err, gone)
	}
	if err := Fail(ctx, gone, be, "x"); !errors.Is(err, ErrBackendGone) || len(gone) != 0 {
		t.Fatalf("fail on a removed backend: %v, wrote %v", err, gone)
	}
	if err := Disconnect(ctx, gone, be); err != nil || len(gone) != 0 {
		t.Fatalf("disconnect a removed backend: %v, wrote %v", err, gone)
	}
}

func TestReadFrontend(t *testing.T) {
	ctx := context.Background()
	const vm1, vm5 = "/vm/11111111-1111-1111-1111-111111111111", "/vm/55555555-5555-5555-5555-555555555555"
	tests := []struct {
		name    string
		nodes   map[string]string // besides the backend's; path+permsSuffix sets perms
		want    Frontend
		ignored string // substring of the one Ignored line, "" for none
	}{
		{"no nodes", nil, Frontend{Target: -1}, ""},
		{"vm owned by the toolstack", map[string]string{"/local/domain/1/vm": vm1, "/local/domain/1/vm" + permsSuffix: "n0 r1"},
			Frontend{VM: vm1, Target: -1}, ""},
		{"vm owned by the guest", map[string]string{"/local/domain/1/vm": vm1, "/local/domain/1/vm" + permsSuffix: "n1"},
			Frontend{Target: -1}, "/local/domain/1/vm: owned by domain 1, not the toolstack"},
		{"vm the guest may write", map[string]string{"/local/domain/1/vm": vm1, "/local/domain/1/vm" + permsSuffix: "n0 b1"},
			Frontend{Target: -1}, "domain 1 may write it"},
		{"vm everyone may write", map[string]string{"/local/domain/1/vm": vm1, "/local/domain/1/vm" + permsSuffix: "w0"},
			Frontend{Target: -1}, "every domain may write it"},
		{"empty vm", map[string]string{"/local/domain/1/vm": ""}, Frontend{Target: -1}, "empty"},
		{"stub domain", map[string]string{"/local/domain/1/vm": vm1, "/local/domain/1/target": "5", "/local/domain/5/vm": vm5},
			Frontend{VM: vm1, Target: 5, TargetVM: vm5}, ""},
		{"stub domain, target written by the guest", map[string]string{"/local/domain/1/vm": vm1, "/local/domain/1/target": "5",
			"/local/domain/1/target" + permsSuffix: "n1", "/local/domain/5/vm": vm5},
			Frontend{VM: vm1, Target: -1}, "/local/domain/1/target: owned by domain 1"},
		{"stub domain, target's vm written by the target", map[string]string{"/local/domain/1/target": "5",
			"/local/domain/5/vm": vm5, "/local/domain/5/vm" + permsSuffix: "n5"},
			Frontend{Target: 5}, "/local/domain/5/vm: owned by domain 5"},
		{"vm unreadable (a driver domain)", map[string]string{"/local/domain/1/vm": vm1, "/local/domain/1/vm" + permsSuffix: "EACCES"},
			Frontend{Target: -1}, "unreadable: /local/domain/1/vm: xenstore get-perms /local/domain/1/vm: permission denied"},
		{"target is itself", map[string]string{"/local/domain/1/target": "1"}, Frontend{Target: -1}, "is not another domain's id"},
		{"target is not a number", map[string]string{"/local/domain/1/target": "x"}, Frontend{Target: -1}, "is not another domain's id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := backendStore("/srv/img", "w")
			for k, v := range tt.nodes {
				s[k] = v
			}
			got := ReadFrontend(ctx, s, be.Domid)
			ignored := strings.Join(got.Ignored, "; ")
			if len(got.Unreadable) > 0 {
				ignored += "unreadable: " + strings.Join(got.Unreadable, "; ")
			}
			if got.VM != tt.want.VM || got.Target != tt.want.Target || got.TargetVM != tt.want.TargetVM {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
			if (tt.ignored == "") != (ignored == "") || !strings.Contains(ignored, tt.ignored) {
				t.Errorf("ignored %q, want %q", ignored, tt.ignored)
			}
		})
	}
}

func TestReadSnapshot(t *testing.T) {
	ctx := context.Background()
	s := backendStore("/srv/img", "w")
	s[be.node("script")] = "/etc/xen/scripts/xenblkd"
	got := ReadSnapshot(ctx, s, be, Script|Params|PhysicalDevice|Dir)
	switch {
	case got.Err != nil:
		t.Fatal(got.Err)
	case !got.Has(Script) || got.Value(Script) != "/etc/xen/scripts/xenblkd" || got.Value(Params) != "/srv/img":
		t.Errorf("values: %+v", got)
	case got.Has(PhysicalDevice) || got.Has(Mode) || got.Gone():
		t.Errorf("presence: %+v", got)
	}
	s["/local/domain/1/name"], s[be.node("dev")] = "guest", "xvda"
	if lb := ParseLabels(ReadSnapshot(ctx, s, be, Params, LabelOps(be)...).Also); lb != (Labels{Domain: "guest", Vdev: "xvda"}) {
		t.Errorf("reads sent with the snapshot: %+v, want guest/xvda", lb)
	}
	if gone := ReadSnapshot(ctx, mapStore{}, be, Script|Dir); !gone.Gone() || gone.Has(Script) {
		t.Errorf("removed backend: %+v", gone)
	}
	if notAsked := ReadSnapshot(ctx, mapStore{}, be, Script); notAsked.Gone() {
		t.Error("Gone without reading the directory")
	}
}

func TestParseRdev(t *testing.T) {
	for _, rdev := range []uint64{unix.Mkdev(7, 0), unix.Mkdev(7, 300), unix.Mkdev(259, 1<<19), unix.Mkdev(8, 17)} {
		if got, err := ParseRdev(FormatRdev(rdev)); err != nil || got != rdev {
			t.Errorf("ParseRdev(FormatRdev(%d)) = %d, %v", rdev, got, err)
		}
	}
	for _, bad := range []string{"", "7", "7:", ":1", "g:1", "7:1:2", "100000000:0"} {
		if _, err := ParseRdev(bad); err == nil {
			t.Errorf("ParseRdev(%q): no error", bad)
		}
	}
}

func FuzzParseRdev(f *testing.F) {
	f.Add("7:12c")
	f.Add("fe:0")
	f.Fuzz(func(t *testing.T, s string) {
		if rdev, err := ParseRdev(s); err == nil {
			if again, err := ParseRdev(FormatRdev(rdev)); err != nil || again != rdev {
				t.Fatalf("ParseRdev(%q) = %d does not round-trip: %d, %v", s, rdev, again, err)
			}
		}
	})
}

func TestListBackends(t *testing.T) {
	s := mapStore{"backend/vbd/7/51728/params": "x", "backend/vbd/7/51712/params": "y", "backend/vbd/3/768/params": "z",
		"backend/vbd/3/bad/params": "w"}
	got, err := ListBackends(context.Background(), s)
	want := []Backend{{3, 768}, {7, 51712}, {7, 51728}}
	if err != nil || len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("ListBackends = %v, %v; want %v", got, err, want)
	}
	if got, err := ListBackends(context.Background(), mapStore{}); err != nil || len(got) != 0 {
		t.Fatalf("no tree: %v, %v", got, err)
	}
}

func TestParseEvent(t *testing.T) {
	tests := []struct {
		path string
		want Event
	}{
		{"backend/vbd", Event{Level: LevelTree}},
		{"backend/vbd/5", Event{Level: LevelDomain, Domid: 5}},
		{"backend/vbd/5/51712", Event{Level: LevelBackend, Domid: 5, Backend: Backend{5, 51712}}},
		{"backend/vbd/5/51712/state", Event{Level: LevelBackend, Domid: 5, Backend: Backend{5, 51712}, Node: "state"}},
		{"backend/vbd/5/51712/queue-0/ring-ref", Event{Level: LevelBackend, Domid: 5, Backend: Backend{5, 51712}, Node: "queue-0"}},
		{"/local/domain/0/backend/vbd/7/1/params", Event{Level: LevelBackend, Domid: 7, Backend: Backend{7, 1}, Node: "params"}},
		{"/local/domain/0/backend/vbd/7/1", Event{Level: LevelBackend, Domid: 7, Backend: Backend{7, 1}}},
		{"backend/vbdx/5", Event{}},
		{"backend/vbd/x", Event{}},
		{"backend/vbd/5/05", Event{}},
		{"backend/vif/5/0", Event{}},
		{"/local/domain/0/device/vbd/1", Event{}},
	}
	for _, tt := range tests {
		if got := ParseEvent(tt.path); got != tt.want {
			t.Errorf("ParseEvent(%q) = %+v, want %+v", tt.path, got, tt.want)
		}
	}
}
