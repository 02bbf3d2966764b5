package model

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
)

type fakeDevice struct {
	host    *fakeHost
	n       int
	diskseq uint64
	closed  bool
}

func (d *fakeDevice) Path() string    { return fmt.Sprintf("/dev/loop%d", d.n) }
func (d *fakeDevice) Rdev() uint64    { return uint64(7<<8 | d.n) }
func (d *fakeDevice) DiskSeq() uint64 { return d.diskseq }
func (d *fakeDevice) Verify() error   { return nil }
func (d *fakeDevice) Close() error {
	d.host.mu.Lock()
	defer d.host.mu.Unlock()
	if d.closed {
		return errors.New("closed twice")
	}
	d.closed = true
	d.host.open--
	return nil
}

type fakeHost struct {
	mu      sync.Mutex
	next    int
	open    int               // devices bound and not closed
	foreign map[FileID]string // a loop device someone else bound
	mounted map[uint64]string
}

func (h *fakeHost) NewLoop(backing *os.File, readOnly bool) (Device, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.next++
	h.open++
	return &fakeDevice{host: h, n: h.next, diskseq: uint64(100 + h.next)}, nil
}

func (h *fakeHost) LoopsOf(file FileID, held func(path string) bool) ([]Binding, error) {
	if p, ok := h.foreign[file]; ok && !held(p) {
		return []Binding{{Path: p, Rdev: 7<<8 | 99, DiskSeq: 1}}, nil
	}
	return nil, nil
}

func (h *fakeHost) MountPoint(rdev uint64) (string, error) { return h.mounted[rdev], nil }

var (
	image  = Target{Kind: RegularFile, Path: "/srv/img", File: FileID{1, 10}}
	image2 = Target{Kind: RegularFile, Path: "/srv/img2", File: FileID{1, 11}}
	disk   = Target{Kind: BlockDevice, Path: "/dev/sdb", Rdev: 8<<8 | 16}
	rw     = Mode{Writable: true}
	ro     = Mode{}
	force  = Mode{Writable: true, Force: true}
)

func add(t *testing.T, m *Model, domid, devid uint32, tg Target, mode Mode) (Attachment, error) {
	t.Helper()
	return m.Add(context.Background(), AddRequest{Key: Key{domid, devid}, Params: tg.Path, Mode: mode, Target: tg})
}

func TestSharingRules(t *testing.T) {
	type step struct {
		domid  uint32
		target Target
		mode   Mode
	}
	tests := []struct {
		name    string
		first   []step
		then    step
		wantErr bool
	}{
		{"rw vs rw other domain", []step{{1, image, rw}}, step{2, image, rw}, true},
		{"rw vs ro other domain", []step{{1, image, ro}}, step{2, image, rw}, true},
		{"ro vs rw other domain", []step{{1, image, rw}}, step{2, image, ro}, true},
		{"ro vs ro other domain", []step{{1, image, ro}}, step{2, image, ro}, false},
		{"rw same domain", []step{{1, image, rw}}, step{1, image, rw}, false},
		{"ro same domain as rw", []step{{1, image, rw}}, step{1, image, ro}, false},
		{"w! overrides", []step{{1, image, rw}}, step{2, image, force}, false},
		{"different files", []step{{1, image, rw}}, step{2, image2, rw}, false},
		{"block rw vs rw", []step{{1, disk, rw}}, step{2, disk, rw}, true},
		{"block ro vs ro", []step{{1, disk, ro}}, step{2, disk, ro}, false},
		{"block same domain", []step{{1, disk, rw}}, step{1, disk, rw}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := New(&fakeHost{}, nil)
			for i, s := range tt.first {
				if _, err := add(t, m, s.domid, uint32(51712+i), s.target, s.mode); err != nil {
					t.Fatalf("setup add: %v", err)
				}
			}
			_, err := add(t, m, tt.then.domid, 51800, tt.then.target, tt.then.mode)
			if got := err != nil; got != tt.wantErr {
				t.Fatalf("add: got err %v, want error %v", err, tt.wantErr)
			}
			if err != nil && !errors.Is(err, ErrConflict) {
				t.Errorf("err %v does not match ErrConflict", err)
			}
		})
	}
}

func TestConflictMessageNamesDomainAndDevice(t *testing.T) {
	m := New(&fakeHost{}, nil)
	if _, err := add(t, m, 3, 51712, image, rw); err != nil {
		t.Fatal(err)
	}
	_, err := add(t, m, 4, 51712, image, rw)
	want := "refusing to attach file /srv/img to domain 4 device 51712: it is already attached to domain 3 (device 51712, mode w, /dev/loop1); use mode w! to override"
	if err == nil || err.Error() != want {
		t.Errorf("got %v\nwant %s", err, want)
	}
}

func TestHostChecks(t *testing.T) {
	h := &fakeHost{foreign: map[FileID]string{image.File: "/dev/loop99"}, mounted: map[uint64]string{disk.Rdev: "/mnt"}}
	m := New(h, nil)
	tests := []struct {
		target  Target
		mode    Mode
		wantErr bool
	}{
		{image, rw, true},
		{image, ro, false},
		{image, force, false},
		{disk, rw, true},
		{disk, ro, false},
		{disk, force, false},
	}
	for i, tt := range tests {
		_, err := add(t, m, uint32(i+1), 51712, tt.target, tt.mode)
		if got := err != nil; got != tt.wantErr {
			t.Errorf("%s %s: got err %v, want error %v", tt.target.Path, tt.mode, err, tt.wantErr)
		}
	}
}

// scanHost reports every device in bound as bound to every file, asking held
// first as a real host does, and records which paths it was told to skip.
type scanHost struct {
	fakeHost
	bound   []Binding
	skipped []string
}

func (h *scanHost) LoopsOf(file FileID, held func(path string) bool) ([]Binding, error) {
	var out []Binding
	for _, b := range h.bound {
		if held(b.Path) {
			h.skipped = append(h.skipped, b.Path)
			continue
		}
		out = append(out, b)
	}
	return out, nil
}

func TestHostCheckSkipsHeldDevices(t *testing.T) {
	h := &scanHost{}
	m := New(h, nil)
	ours, err := add(t, m, 1, 51712, image2, rw)
	if err != nil {
		t.Fatal(err)
	}
	h.bound = []Binding{{Path: ours.DevPath, Rdev: ours.Rdev, DiskSeq: ours.DiskSeq}}
	if _, err := add(t, m, 2, 51712, image, rw); err != nil {
		t.Fatalf("add with only our own device bound: %v", err)
	}
	if want := []string{ours.DevPath}; fmt.Sprint(h.skipped) != fmt.Sprint(want) {
		t.Errorf("skipped %v, want %v", h.skipped, want)
	}

	h.bound = append(h.bound, Binding{Path: "/dev/loop99", Rdev: 7<<8 | 99, DiskSeq: 1, Tag: "other"})
	_, err = add(t, m, 2, 51728, image, rw) // same domain: only the host check applies
	want := `refusing to attach file /srv/img to domain 2 device 51728: loop device /dev/loop99 (not held by xenblkd, tag "other") is bound to this file; detach it (losetup -d /dev/loop99) or use mode w! to override`
	if err == nil || err.Error() != want {
		t.Errorf("got %v\nwant %s", err, want)
	}

	// Released devices are no longer ours: found again.
	m.Remove(Key{1, 51712})
	m.Remove(Key{2, 51712})
	h.skipped = nil
	h.bound = h.bound[:1]
	if _, err := add(t, m, 4, 51712, image, rw); !errors.Is(err, ErrConflict) {
		t.Errorf("add with a released device still bound: got %v, want a conflict", err)
	}
	if len(h.skipped) != 0 {
		t.Errorf("skipped %v after release, want none", h.skipped)
	}
}

func TestReadOnlyCacheSharesOneDevice(t *testing.T) {
	h := &fakeHost{}
	m := New(h, nil)
	var first Attachment
	for dom := uint32(1); dom <= 20; dom++ {
		a, err := add(t, m, dom, 51712, image, ro)
		if err != nil {
			t.Fatal(err)
		}
		if dom == 1 {
			first = a
		}
		if a.Rdev != first.Rdev || a.Users != int(dom) {
			t.Fatalf("domain %d: got rdev %x users %d, want rdev %x users %d", dom, a.Rdev, a.Users, first.Rdev, dom)
		}
	}
	if h.open != 1 {
		t.Fatalf("got %d devices, want 1", h.open)
	}
	for dom := uint32(1); dom <= 20; dom++ {
		m.Remove(Key{dom, 51712})
		if want := 1; dom < 20 && h.open != want {
			t.Fatalf("after removing domain %d: %d devices open, want %d", dom, h.open, want)
		}
	}
	if h.open != 0 {
		t.Fatalf("after last remove: %d devices open, want 0", h.open)
	}
	// The cache entry is gone: a new read-only add binds a new device.
	a, err := add(t, m, 1, 51712, image, ro)
	if err != nil || a.Rdev == first.Rdev {
		t.Fatalf("re-add: got %+v, %v; want a new device", a, err)
	}
}

func TestWritableGetsOwnDevice(t *testing.T) {
	h := &fakeHost{}
	m := New(h, nil)
	a1, _ := add(t, m, 1, 51712, image, rw)
	a2, _ := add(t, m, 1, 51713, image, rw)
	a3, _ := add(t, m, 1, 51714, image, ro)
	if a1.Rdev == a2.Rdev || a1.Rdev == a3.Rdev || h.open != 3 {
		t.Fatalf("got %x %x %x with %d devices, want 3 distinct", a1.Rdev, a2.Rdev, a3.Rdev, h.open)
	}
}

func TestAddIdempotentRemoveTwice(t *testing.T) {
	h := &fakeHost{}
	m := New(h, nil)
	a1, err := add(t, m, 1, 51712, image, rw)
	if err != nil {
		t.Fatal(err)
	}
	a2, err := add(t, m, 1, 51712, image, rw)
	if err != nil || a2.Rdev != a1.Rdev || h.open != 1 {
		t.Fatalf("second add: got %+v, %v (%d devices); want the same attachment", a2, err, h.open)
	}
	if _, err := add(t, m, 1, 51712, image2, rw); err == nil {
		t.Fatal("add of another target to an attached backend: want error")
	}
	if _, ok := m.Remove(Key{1, 51712}); !ok {
		t.Fatal("first remove: not found")
	}
	if _, ok := m.Remove(Key{1, 51712}); ok {
		t.Fatal("second remove: found")
	}
	if h.open != 0 {
		t.Fatalf("%d devices open, want 0", h.open)
	}
}

func TestConcurrentAddRemove(t *testing.T) {
	h := &fakeHost{}
	m := New(h, nil)
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tg := image
			mode := ro
			if i%2 == 0 {
				tg = Target{Kind: RegularFile, Path: fmt.Sprint("/srv/", i), File: FileID{2, uint64(i)}}
				mode = rw
			}
			if _, err := add(t, m, uint32(i+1), 51712, tg, mode); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if got, want := len(m.List()), 16; got != want {
		t.Fatalf("got %d attachments, want %d", got, want)
	}
	if got, want := h.open, 9; got != want {
		t.Fatalf("got %d devices, want %d (8 writable + 1 shared read-only)", got, want)
	}
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); m.Remove(Key{uint32(i + 1), 51712}) }()
	}
	wg.Wait()
	if h.open != 0 || m.Devices() != 0 || len(m.List()) != 0 {
		t.Fatalf("after removes: %d devices open, %d held, %d attachments", h.open, m.Devices(), len(m.List()))
	}
}

func TestRestore(t *testing.T) {
	h := &fakeHost{}
	m := New(h, nil)
	dev, _ := h.NewLoop(nil, true)
	for dom := uint32(1); dom <= 2; dom++ {
		if err := m.Restore(Attachment{Key: Key{dom, 51712}, Mode: ro, Target: image}, dev); err != nil {
			t.Fatal(err)
		}
	}
	a, err := add(t, m, 3, 51712, image, ro)
	if err != nil || a.Rdev != dev.Rdev() || a.Users != 3 {
		t.Fatalf("add after restore: got %+v, %v; want the restored device with 3 users", a, err)
	}
}

func TestParseMode(t *testing.T) {
	tests := []struct {
		in      string
		want    Mode
		wantErr bool
	}{
		{"w", Mode{Writable: true}, false},
		{"r", Mode{}, false},
		{"w!", Mode{Writable: true, Force: true}, false},
		{"r!", Mode{Force: true}, false},
		{"rw", Mode{Writable: true}, false},
		{"", Mode{}, true},
		{"!", Mode{}, true},
		{"x", Mode{}, true},
		{"write", Mode{}, true},
		{"wwwwwwwwwwwwwwwwwwww", Mode{}, true},
	}
	for _, tt := range tests {
		got, err := ParseMode(tt.in)
		if (err != nil) != tt.wantErr || (err == nil && got != tt.want) {
			t.Errorf("ParseMode(%q) = %+v, %v; want %+v, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}
