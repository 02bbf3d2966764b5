package model_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	. "xenblkd/internal/model"
	"xenblkd/internal/model/modeltest"
)

var (
	image  = Target{Kind: RegularFile, Path: "/srv/img", File: FileID{1, 10}}
	image2 = Target{Kind: RegularFile, Path: "/srv/img2", File: FileID{1, 11}}
	// ourLoop1 is the first loop device the fake host makes, named by phy:.
	ourLoop1 = Target{Kind: BlockDevice, Path: "/dev/loop1", Rdev: 7<<8 | 1, Backing: image.File, BackingPath: image.Path}
	// loop50 and loop51 are someone else's loop devices on image.
	loop50 = Target{Kind: BlockDevice, Path: "/dev/loop50", Rdev: 7<<8 | 50, Backing: image.File, BackingPath: image.Path}
	loop51 = Target{Kind: BlockDevice, Path: "/dev/loop51", Rdev: 7<<8 | 51, Backing: image.File, BackingPath: image.Path}
	disk   = Target{Kind: BlockDevice, Path: "/dev/sdb", Rdev: 8<<8 | 16, Partitions: []uint64{8<<8 | 17, 8<<8 | 18}}
	sdb1   = Target{Kind: BlockDevice, Path: "/dev/sdb1", Rdev: 8<<8 | 17, Whole: 8<<8 | 16}
	sdb2   = Target{Kind: BlockDevice, Path: "/dev/sdb2", Rdev: 8<<8 | 18, Whole: 8<<8 | 16}
	rw     = Mode{Writable: true}
	ro     = Mode{}
	force  = Mode{Writable: true, Force: true}
	forceR = Mode{Force: true}

	vmA     = Domain{VM: "/vm/a"}
	vmB     = Domain{VM: "/vm/b"}
	stubOfA = Domain{VM: "/vm/a-dm", TargetVM: "/vm/a"}
	stubOfB = Domain{VM: "/vm/b-dm", TargetVM: "/vm/b"}
	noVM    = Domain{}
)

func add(t *testing.T, m *Model, domid, devid uint32, tg Target, mode Mode) (Attachment, error) {
	t.Helper()
	return addAs(t, m, domid, devid, tg, mode, Domain{})
}

// testDomains is what the toolstack says about each model's domains: addAs
// records the domain it adds as (*Model → *sync.Map of domid → Domain).
var testDomains sync.Map

func addAs(t *testing.T, m *Model, domid, devid uint32, tg Target, mode Mode, dom Domain) (Attachment, error) {
	t.Helper()
	v, _ := testDomains.LoadOrStore(m, &sync.Map{})
	doms := v.(*sync.Map)
	doms.Store(domid, dom)
	domains := func(_ context.Context, domid uint32) Domain {
		d, _ := doms.Load(domid)
		dom, _ := d.(Domain)
		return dom
	}
	return m.Add(context.Background(), AddRequest{Key: Key{domid, devid}, Params: tg.Path, Mode: mode, Target: tg, Domains: domains})
}

func TestSharingRules(t *testing.T) {
	type step struct {
		domid  uint32
		target Target
		mode   Mode
		dom    Domain
	}
	tests := []struct {
		name    string
		first   []step
		then    step
		wantErr bool
	}{
		{"rw vs rw other domain", []step{{1, image, rw, vmA}}, step{2, image, rw, vmB}, true},
		{"rw vs ro other domain", []step{{1, image, ro, vmA}}, step{2, image, rw, vmB}, true},
		{"ro vs rw other domain", []step{{1, image, rw, vmA}}, step{2, image, ro, vmB}, true},
		{"ro vs ro other domain", []step{{1, image, ro, vmA}}, step{2, image, ro, vmB}, false},
		{"rw same domain", []step{{1, image, rw, vmA}}, step{1, image, rw, vmA}, false},
		{"ro same domain as rw", []step{{1, image, rw, vmA}}, step{1, image, ro, vmA}, false},
		{"w! overrides", []step{{1, image, rw, vmA}}, step{2, image, force, vmB}, false},
		{"r! overrides", []step{{1, image, rw, vmA}}, step{2, image, forceR, vmB}, false},
		{"different files", []step{{1, image, rw, vmA}}, step{2, image2, rw, vmB}, false},

		{"same VM rw file (migrate to localhost)", []step{{1, image, rw, vmA}}, step{2, image, rw, vmA}, false},
		{"same VM rw phy (migrate to localhost)", []step{{1, loop50, rw, vmA}}, step{2, loop50, rw, vmA}, false},
		{"same VM rw block device", []step{{1, disk, rw, vmA}}, step{2, disk, rw, vmA}, false},
		{"unknown VMs never match", []step{{1, image, rw, noVM}}, step{2, image, rw, noVM}, true},
		{"unknown VM vs known", []step{{1, image, rw, vmA}}, step{2, image, rw, noVM}, true},
		{"stub domain asks for its guest's disk", []step{{1, image, rw, vmA}}, step{2, image, rw, stubOfA}, false},
		{"guest asks for its stub domain's disk", []step{{2, image, rw, stubOfA}}, step{1, image, rw, vmA}, false},
		{"stub domain of another VM", []step{{1, image, rw, vmA}}, step{2, image, rw, stubOfB}, true},
		{"two stub domains of one VM", []step{{1, image, rw, stubOfA}}, step{2, image, rw, Domain{VM: "/vm/x", TargetVM: "/vm/a"}}, false},
		{"stub domains of two VMs", []step{{1, image, rw, stubOfA}}, step{2, image, rw, stubOfB}, true},
		{"same VM, third domain of another VM", []step{{1, image, rw, vmA}, {2, image, rw, vmA}}, step{3, image, ro, vmB}, true},

		{"phy: our rw device for another domain", []step{{1, image, rw, vmA}}, step{2, ourLoop1, rw, vmB}, true},
		{"phy: our rw device, read-only", []step{{1, image, rw, vmA}}, step{2, ourLoop1, ro, vmB}, true},
		{"phy: our shared ro device asked w", []step{{1, image, ro, vmA}}, step{2, ourLoop1, rw, vmB}, true},
		{"phy: our shared ro device asked r", []step{{1, image, ro, vmA}}, step{2, ourLoop1, ro, vmB}, false},
		{"phy: someone's loop on a file we have rw", []step{{1, image, rw, vmA}}, step{2, loop50, rw, vmB}, true},
		{"file whose loop device a guest has rw by phy:", []step{{1, loop50, rw, vmA}}, step{2, image, ro, vmB}, true},
		{"two loop devices on one file", []step{{1, loop50, rw, vmA}}, step{2, loop51, rw, vmB}, true},
		{"two loop devices on one file, read-only", []step{{1, loop50, ro, vmA}}, step{2, loop51, ro, vmB}, false},

		{"block rw vs rw", []step{{1, disk, rw, vmA}}, step{2, disk, rw, vmB}, true},
		{"block ro vs ro", []step{{1, disk, ro, vmA}}, step{2, disk, ro, vmB}, false},
		{"block same domain", []step{{1, disk, rw, vmA}}, step{1, disk, rw, vmA}, false},
		{"whole disk while a partition is rw", []step{{1, sdb1, rw, vmA}}, step{2, disk, ro, vmB}, true},
		{"partition while the whole disk is rw", []step{{1, disk, rw, vmA}}, step{2, sdb1, rw, vmB}, true},
		{"partition while the whole disk is ro", []step{{1, disk, ro, vmA}}, step{2, sdb1, ro, vmB}, false},
		{"sibling partitions", []step{{1, sdb1, rw, vmA}}, step{2, sdb2, rw, vmB}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := New(&modeltest.Host{}, nil)
			for i, s := range tt.first {
				if _, err := addAs(t, m, s.domid, uint32(51712+i), s.target, s.mode, s.dom); err != nil {
					t.Fatalf("setup add: %v", err)
				}
			}
			_, err := addAs(t, m, tt.then.domid, 51800, tt.then.target, tt.then.mode, tt.then.dom)
			if got := err != nil; got != tt.wantErr {
				t.Fatalf("add: got err %v, want error %v", err, tt.wantErr)
			}
			if err != nil && !errors.Is(err, ErrConflict) {
				t.Errorf("err %v does not match ErrConflict", err)
			}
		})
	}
}

func TestConflictMessages(t *testing.T) {
	tests := []struct {
		name  string
		first []AddRequest
		then  AddRequest
		want  string
	}{
		{"rw file", []AddRequest{{Key: Key{3, 51712}, Mode: rw, Target: image}}, AddRequest{Key: Key{4, 51712}, Mode: rw, Target: image},
			"refusing to attach file /srv/img to domain 4 device 51712 (xvda): domain 3 device 51712 (xvda) already uses it read-write (mode w, /dev/loop1); detach it there first (xl block-detach 3 51712) or give this domain its own copy; mode w! overrides"},
		{"ro file asked w", []AddRequest{{Key: Key{3, 51728}, Mode: ro, Target: image}}, AddRequest{Key: Key{4, 51712}, Mode: rw, Target: image},
			"refusing to attach file /srv/img to domain 4 device 51712 (xvda): domain 3 device 51728 (xvdb) already uses it read-only (mode r, /dev/loop1); it can only be shared read-only: use access=ro here, detach it there first (xl block-detach 3 51728), or use mode w! to override"},
		{"phy of our device", []AddRequest{{Key: Key{3, 51712}, Mode: rw, Target: image}}, AddRequest{Key: Key{4, 51712}, Mode: rw, Target: ourLoop1},
			"refusing to attach block device /dev/loop1 (a loop device bound to /srv/img) to domain 4 device 51712 (xvda): domain 3 device 51712 (xvda) already uses the file /srv/img (bound to this loop device) read-write (mode w, /dev/loop1); detach it there first (xl block-detach 3 51712) or give this domain its own copy; mode w! overrides"},
		{"file of a phy loop", []AddRequest{{Key: Key{3, 51712}, Mode: rw, Target: loop50}}, AddRequest{Key: Key{4, 268439552}, Mode: rw, Target: image},
			"refusing to attach file /srv/img to domain 4 device 268439552 (xvdq): domain 3 device 51712 (xvda) already uses loop device /dev/loop50 (bound to this file) read-write (mode w, /dev/loop50); detach it there first (xl block-detach 3 51712) or give this domain its own copy; mode w! overrides"},
		{"partition of a disk", []AddRequest{{Key: Key{3, 51713}, Mode: rw, Target: sdb1}}, AddRequest{Key: Key{4, 51712}, Mode: rw, Target: disk},
			"refusing to attach block device /dev/sdb to domain 4 device 51712 (xvda): domain 3 device 51713 (xvda1) already uses its partition /dev/sdb1 read-write (mode w, /dev/sdb1); detach it there first (xl block-detach 3 51713) or give this domain its own copy; mode w! overrides"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := New(&modeltest.Host{}, nil)
			for _, r := range tt.first {
				if _, err := m.Add(context.Background(), r); err != nil {
					t.Fatal(err)
				}
			}
			_, err := m.Add(context.Background(), tt.then)
			if err == nil || err.Error() != tt.want {
				t.Errorf("got  %v\nwant %s", err, tt.want)
			}
		})
	}
}

func TestHostChecks(t *testing.T) {
	other := Binding{Path: "/dev/loop50", Rdev: loop50.Rdev, DiskSeq: 1, Tag: "/srv/img"}
	other2 := Binding{Path: "/dev/loop51", Rdev: loop51.Rdev, DiskSeq: 2, Tag: "/srv/img"}
	tests := []struct {
		name    string
		foreign []Binding
		mounted map[uint64]Mount
		target  Target
		mode    Mode
		want    string // "" for no error, else a substring of it
	}{
		{"foreign loop on file, rw", []Binding{other}, nil, image, rw, "loop device /dev/loop50 (not made by xenblkd, tag \"/srv/img\") is bound to the same file; detach it (losetup -d /dev/loop50)"},
		{"foreign loop on file, ro", []Binding{other}, nil, image, ro, ""},
		{"foreign loop on file, w!", []Binding{other}, nil, image, force, ""},
		{"foreign loop mounted rw, ro", []Binding{other}, map[uint64]Mount{loop50.Rdev: {Source: "/dev/loop50", Point: "/mnt"}}, image, ro,
			"loop device /dev/loop50 (bound to the same file) is mounted read-write on /mnt in this domain"},
		{"foreign loop mounted ro, ro", []Binding{other}, map[uint64]Mount{loop50.Rdev: {Source: "/dev/loop50", Point: "/mnt", ReadOnly: true}}, image, ro, ""},
		{"phy: loop, itself only", []Binding{other}, nil, loop50, rw, ""},
		{"phy: loop, a second loop on its file", []Binding{other, other2}, nil, loop50, rw, "loop device /dev/loop51 (not made by xenblkd"},
		{"disk mounted, rw", nil, map[uint64]Mount{disk.Rdev: {Source: "/dev/sdb", Point: "/mnt"}}, disk, rw, "it is mounted on /mnt in this domain; unmount it, or use mode w! to override"},
		{"disk mounted rw, ro", nil, map[uint64]Mount{disk.Rdev: {Source: "/dev/sdb", Point: "/mnt"}}, disk, ro, "it is mounted read-write on /mnt"},
		{"disk mounted ro, ro", nil, map[uint64]Mount{disk.Rdev: {Source: "/dev/sdb", Point: "/mnt", ReadOnly: true}}, disk, ro, ""},
		{"disk mounted, w!", nil, map[uint64]Mount{disk.Rdev: {Source: "/dev/sdb", Point: "/mnt"}}, disk, force, ""},
		{"disk whose partition is mounted", nil, map[uint64]Mount{sdb1.Rdev: {Source: "/dev/sdb1", Point: "/boot"}}, disk, rw, "its partition /dev/sdb1 is mounted on /boot"},
		{"partition whose disk is mounted", nil, map[uint64]Mount{disk.Rdev: {Source: "/dev/sdb", Point: "/mnt"}}, sdb1, rw, "its whole disk /dev/sdb is mounted on /mnt"},
		{"partition whose sibling is mounted", nil, map[uint64]Mount{sdb1.Rdev: {Source: "/dev/sdb1", Point: "/boot"}}, sdb2, rw, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := &modeltest.Host{}
			for _, b := range tt.foreign {
				h.Bind(image.File, b)
			}
			for rdev, mt := range tt.mounted {
				h.Mount(rdev, mt)
			}
			m := New(h, nil)
			_, err := add(t, m, 1, 51712, tt.target, tt.mode)
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("got %v, want no error", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("got %v, want an error containing %q", err, tt.want)
			case err != nil && !errors.Is(err, ErrConflict):
				t.Errorf("err %v does not match ErrConflict", err)
			}
			if err != nil && h.Open() != 0 {
				t.Errorf("refused, yet %d devices left open", h.Open())
			}
		})
	}
}

// A loop device of ours or one attached by phy: to a domain of the same VM
// is not someone else's.
func TestHostCheckKnownLoops(t *testing.T) {
	other := Binding{Path: "/dev/loop50", Rdev: loop50.Rdev, DiskSeq: 1}
	h := &modeltest.Host{}
	h.Bind(image.File, other)
	m := New(h, nil)
	if _, err := addAs(t, m, 1, 51712, loop50, rw, vmA); err != nil {
		t.Fatal(err)
	}
	if _, err := addAs(t, m, 2, 51712, image, rw, vmA); err != nil {
		t.Fatalf("same VM, file of its phy: loop device: %v", err)
	}
}

func TestVdevName(t *testing.T) {
	for devid, want := range map[uint32]string{
		51712: "xvda", 51713: "xvda1", 51728: "xvdb", 51967: "xvdp15", 268439552: "xvdq",
		268442112: "xvdaa", 2048: "sda", 2066: "sdb2", 768: "", 5: "",
	} {
		if got := VdevName(devid); got != want {
			t.Errorf("VdevName(%d) = %q, want %q", devid, got, want)
		}
	}
}

func TestHostCheckSkipsHeldDevices(t *testing.T) {
	// Every device of ours is bound to image, whatever it was made for.
	h := &modeltest.Host{File: image.File}
	m := New(h, nil)
	ours, err := add(t, m, 1, 51712, image2, rw)
	if err != nil {
		t.Fatal(err)
	}
	h.ResetLookups()
	if _, err := add(t, m, 2, 51712, image, rw); err != nil {
		t.Fatalf("add with only our own device bound: %v", err)
	}
	if want := []string{ours.DevPath}; fmt.Sprint(h.Skipped()) != fmt.Sprint(want) {
		t.Errorf("skipped %v, want %v", h.Skipped(), want)
	}

	h.Bind(image.File, Binding{Path: "/dev/loop99", Rdev: 7<<8 | 99, DiskSeq: 1, Tag: "other"})
	_, err = add(t, m, 2, 51728, image, rw) // same domain: only the host check applies
	want := `refusing to attach file /srv/img to domain 2 device 51728 (xvdb): loop device /dev/loop99 (not made by xenblkd, tag "other") is bound to the same file; detach it (losetup -d /dev/loop99) if nothing uses it, or use mode w! to override`
	if err == nil || err.Error() != want {
		t.Errorf("got %v\nwant %s", err, want)
	}

	// Released devices are no longer held: found again (and, as they stay
	// bound, waited for, then refused).
	m.Remove(Key{1, 51712})
	m.Remove(Key{2, 51712})
	h.Unbind()
	h.Linger = -1
	SetReleaseTiming(m, 20*time.Millisecond, time.Millisecond)
	h.ResetLookups()
	if _, err := add(t, m, 4, 51712, image, rw); !errors.Is(err, ErrConflict) {
		t.Errorf("add with a released device still bound: got %v, want a conflict", err)
	}
	if len(h.Skipped()) != 0 {
		t.Errorf("skipped %v after release, want none", h.Skipped())
	}
}

func TestReadOnlyCacheSharesOneDevice(t *testing.T) {
	h := &modeltest.Host{}
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
	if h.Open() != 1 {
		t.Fatalf("got %d devices, want 1", h.Open())
	}
	for dom := uint32(1); dom <= 20; dom++ {
		m.Remove(Key{dom, 51712})
		if want := 1; dom < 20 && h.Open() != want {
			t.Fatalf("after removing domain %d: %d devices open, want %d", dom, h.Open(), want)
		}
	}
	if h.Open() != 0 {
		t.Fatalf("after last remove: %d devices open, want 0", h.Open())
	}
	// The cache entry is gone: a new read-only add binds a new device.
	a, err := add(t, m, 1, 51712, image, ro)
	if err != nil || a.Rdev == first.Rdev {
		t.Fatalf("re-add: got %+v, %v; want a new device", a, err)
	}
}

func TestWritableGetsOwnDevice(t *testing.T) {
	h := &modeltest.Host{}
	m := New(h, nil)
	a1, _ := add(t, m, 1, 51712, image, rw)
	a2, _ := add(t, m, 1, 51713, image, rw)
	a3, _ := add(t, m, 1, 51714, image, ro)
	if a1.Rdev == a2.Rdev || a1.Rdev == a3.Rdev || h.Open() != 3 {
		t.Fatalf("got %x %x %x with %d devices, want 3 distinct", a1.Rdev, a2.Rdev, a3.Rdev, h.Open())
	}
}

func TestAddIdempotentRemoveTwice(t *testing.T) {
	h := &modeltest.Host{}
	m := New(h, nil)
	a1, err := add(t, m, 1, 51712, image, rw)
	if err != nil {
		t.Fatal(err)
	}
	a2, err := add(t, m, 1, 51712, image, rw)
	if err != nil || a2.Rdev != a1.Rdev || h.Open() != 1 {
		t.Fatalf("second add: got %+v, %v (%d devices); want the same attachment", a2, err, h.Open())
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
	if h.Open() != 0 {
		t.Fatalf("%d devices open, want 0", h.Open())
	}
}

func TestConcurrentAddRemove(t *testing.T) {
	h := &modeltest.Host{}
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
	if got, want := h.Open(), 9; got != want {
		t.Fatalf("got %d devices, want %d (8 writable + 1 shared read-only)", got, want)
	}
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); m.Remove(Key{uint32(i + 1), 51712}) }()
	}
	wg.Wait()
	if h.Open() != 0 || len(m.Held()) != 0 || len(m.List()) != 0 {
		t.Fatalf("after removes: %d devices open, %d held, %d attachments", h.Open(), len(m.Held()), len(m.List()))
	}
}

func TestRestore(t *testing.T) {
	h := &modeltest.Host{}
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

// slowHost widens the window between the sharing check and the record.
type slowHost struct{ modeltest.Host }

func (h *slowHost) LoopsOf(file FileID, held func(path string) bool) ([]Binding, error) {
	time.Sleep(time.Millisecond)
	return nil, nil
}

func (h *slowHost) Mounts(devs []uint64) ([]Mount, error) {
	time.Sleep(time.Millisecond)
	return nil, nil
}

// Two requests naming the same thing differently never both win.
func TestConcurrentConflictingAdds(t *testing.T) {
	pairs := []struct {
		name string
		a, b Target
	}{
		{"file and a loop device on it", image, loop50},
		{"two loop devices on one file", loop50, loop51},
		{"whole disk and partition", disk, sdb1},
		{"loop device and its partition", loop50, Target{Kind: BlockDevice, Path: "/dev/loop50p1", Rdev: 259 << 8, Whole: loop50.Rdev}},
	}
	for _, p := range pairs {
		t.Run(p.name, func(t *testing.T) {
			for round := 0; round < 20; round++ {
				m := New(&slowHost{}, nil)
				var wg sync.WaitGroup
				errs := make([]error, 2)
				for i, tg := range []Target{p.a, p.b} {
					wg.Go(func() { _, errs[i] = addAs(t, m, uint32(i+1), 51712, tg, rw, Domain{VM: fmt.Sprint("/vm/", i)}) })
				}
				wg.Wait()
				if (errs[0] == nil) == (errs[1] == nil) {
					t.Fatalf("round %d: got %v and %v; want exactly one refused", round, errs[0], errs[1])
				}
			}
		})
	}
}

// An add right after the remove of a device on the same file waits for that
// device to be freed; only a device xenblkd released is waited for.
func TestAddWaitsForReleasedDevice(t *testing.T) {
	ours := func(n int, seq uint64) Binding {
		return Binding{Path: fmt.Sprintf("/dev/loop%d", n), Rdev: uint64(7<<8 | n), DiskSeq: seq, Tag: "xenblkd:", Ours: true}
	}
	tests := []struct {
		name        string
		linger      int       // lookups the released /dev/loop1 stays bound for; < 0 forever
		foreign     []Binding // also bound to the file
		mode        Mode
		wantErr     string // "" for success, else a substring
		wantLookups int    // by the second add; 0: at least linger+1
	}{
		{"freed at once", 0, nil, rw, "", 1},
		{"freed after 3 lookups", 3, nil, rw, "", 4},
		{"never freed", -1, nil, rw,
			"refusing to attach file /srv/img to domain 2 device 51712 (xvda): loop device /dev/loop1 (diskseq 101), which xenblkd released ", 0},
		{"read-only: not waited for", -1, nil, ro, "", 1},
		{"foreign device too: refused at once", -1, []Binding{{Path: "/dev/loop50", Rdev: loop50.Rdev, DiskSeq: 7, Tag: "/srv/img"}}, rw,
			`loop device /dev/loop50 (not made by xenblkd, tag "/srv/img") is bound to the same file`, 1},
		{"our tag, never released: refused at once", 0, []Binding{ours(60, 500)}, rw,
			`loop device /dev/loop60 (tag "xenblkd:", xenblkd's, but not held by this daemon: another xenblkd with the same --tag made it)`, 1},
		{"our number, another diskseq: refused at once", 0, []Binding{ours(1, 900)}, rw, "loop device /dev/loop1 (tag \"xenblkd:\", xenblkd's, but not held", 1},
		{"released diskseq, another tag: refused at once", 0, []Binding{{Path: "/dev/loop1", Rdev: 7<<8 | 1, DiskSeq: 101, Tag: "other"}}, rw,
			`loop device /dev/loop1 (not made by xenblkd, tag "other")`, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := &modeltest.Host{File: image.File, Linger: tt.linger}
			m := New(h, nil)
			SetReleaseTiming(m, 50*time.Millisecond, time.Millisecond)
			if _, err := add(t, m, 1, 51712, image, rw); err != nil {
				t.Fatal(err)
			}
			m.Remove(Key{1, 51712})
			for _, b := range tt.foreign {
				h.Bind(image.File, b)
			}
			h.ResetLookups()
			_, err := add(t, m, 2, 51712, image, tt.mode)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("got %v, want no error", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("got %v\nwant an error containing %q", err, tt.wantErr)
			case err != nil && !errors.Is(err, ErrConflict):
				t.Errorf("err %v does not match ErrConflict", err)
			}
			if tt.wantLookups > 0 && h.Lookups() != tt.wantLookups {
				t.Errorf("the add looked %d times, want %d", h.Lookups(), tt.wantLookups)
			}
			if tt.wantLookups == 0 && h.Lookups() < 2 {
				t.Errorf("the add looked %d times, want it to have waited (several)", h.Lookups())
			}
			if err != nil && h.Open() != 0 {
				t.Errorf("refused, yet %d devices left open", h.Open())
			}
		})
	}
}

// The wait for a released device is logged when it starts and when it ends,
// with the device waited for: an operator sees why the add took longer, and
// a test can let the device go once the add waits for it. An add that finds
// the device freed at once logs neither.
func TestReleasedWaitLogged(t *testing.T) {
	for _, tt := range []struct {
		name   string
		linger int
		want   []string // in order
	}{
		{"freed at once", 0, nil},
		{"freed after 3 lookups", 3, []string{
			`msg="sharing check: waiting for the loop device xenblkd released to be freed" domid=2 devid=51712 file=/srv/img dev=/dev/loop1 diskseq=101 `,
			`msg="sharing check: the loop device xenblkd released is freed" domid=2 devid=51712 file=/srv/img waited=`,
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var buf strings.Builder
			m := New(&modeltest.Host{File: image.File, Linger: tt.linger}, slog.New(slog.NewTextHandler(&buf, nil)))
			SetReleaseTiming(m, time.Minute, time.Millisecond)
			if _, err := add(t, m, 1, 51712, image, rw); err != nil {
				t.Fatal(err)
			}
			m.Remove(Key{1, 51712})
			buf.Reset()
			if _, err := add(t, m, 2, 51712, image, rw); err != nil {
				t.Fatal(err)
			}
			log := buf.String()
			if tt.want == nil && strings.Contains(log, "released") {
				t.Errorf("logged a wait for a device freed at once:\n%s", log)
			}
			at := 0
			for _, w := range tt.want {
				i := strings.Index(log[at:], w)
				if i < 0 {
					t.Fatalf("log lacks %q after offset %d:\n%s", w, at, log)
				}
				at += i + len(w)
			}
		})
	}
}

// The refusal past the bound says what to do.
func TestReleasedDeviceStillHeldMessage(t *testing.T) {
	h := &modeltest.Host{File: image.File, Linger: -1}
	m := New(h, nil)
	SetReleaseTiming(m, 20*time.Millisecond, time.Millisecond)
	if _, err := add(t, m, 1, 51712, image, rw); err != nil {
		t.Fatal(err)
	}
	m.Remove(Key{1, 51712})
	_, err := add(t, m, 2, 51712, image, rw)
	for _, want := range []string{
		"loop device /dev/loop1 (diskseq 101), which xenblkd released ",
		" ago, is still bound to the same file (waited 20ms for it to be freed): something still holds it open; find it with fuser -v /dev/loop1 (if no process is listed, the kernel holds it: a mount, or xen-blkback of a domain still being destroyed) and retry once it is closed, or use mode w! to override",
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("got %v\nwant it to contain %q", err, want)
		}
	}
	// w! does not wait.
	h.ResetLookups()
	if _, err := add(t, m, 3, 51712, image, force); err != nil || h.Lookups() != 0 {
		t.Errorf("w!: got %v after %d lookups, want success without any", err, h.Lookups())
	}
}

// A device the model binds again under a number it released is not one it
// released; a device let go of by Release (recovery) is.
func TestReleasedBookkeeping(t *testing.T) {
	h := &modeltest.Host{File: image.File, Linger: 2}
	m := New(h, nil)
	SetReleaseTiming(m, time.Second, time.Millisecond)
	dev, _ := h.NewLoop(nil, false)
	m.Release(dev)
	h.ResetLookups()
	if _, err := add(t, m, 1, 51712, image, rw); err != nil || h.Lookups() != 3 {
		t.Fatalf("add after Release: got %v after %d lookups, want success after 3", err, h.Lookups())
	}
	if n := ReleasedCount(m); n != 1 {
		t.Errorf("%d released devices remembered, want 1", n)
	}

	// Release of a device a backend uses (restored) closes nothing.
	h2 := &modeltest.Host{}
	m2 := New(h2, nil)
	used, _ := h2.NewLoop(nil, false)
	if err := m2.Restore(Attachment{Key: Key{1, 51712}, Mode: rw, Target: image}, used); err != nil {
		t.Fatal(err)
	}
	m2.Release(used)
	if h2.Open() != 1 || ReleasedCount(m2) != 0 {
		t.Errorf("Release of a used device: %d open, %d remembered; want 1, 0", h2.Open(), ReleasedCount(m2))
	}
}

// A request given up while waiting is not a sharing refusal.
func TestReleasedWaitCancelled(t *testing.T) {
	h := &modeltest.Host{File: image.File, Linger: -1}
	m := New(h, nil)
	SetReleaseTiming(m, 0, time.Millisecond)
	if _, err := add(t, m, 1, 51712, image, rw); err != nil {
		t.Fatal(err)
	}
	m.Remove(Key{1, 51712})
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for {
			if h.Lookups() > 1 {
				cancel()
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	_, err := m.Add(ctx, AddRequest{Key: Key{2, 51712}, Mode: rw, Target: image})
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrConflict) || !strings.Contains(err.Error(), "released by xenblkd") {
		t.Fatalf("got %v, want context.Canceled naming the device waited for", err)
	}
}

// TestIOModeReported: every attachment of a loop device carries the device's
// I/O mode (shared read-only users too, and Held); block devices carry none.
func TestIOModeReported(t *testing.T) {
	m := New(&modeltest.Host{}, nil)
	first, err := add(t, m, 1, 51712, image, ro) // fake device 1: buffered
	if err != nil {
		t.Fatal(err)
	}
	second, err := add(t, m, 2, 51712, image, ro) // shares device 1
	if err != nil {
		t.Fatal(err)
	}
	third, err := add(t, m, 3, 51712, image2, rw) // fake device 2: direct
	if err != nil {
		t.Fatal(err)
	}
	blk, err := add(t, m, 4, 51712, disk, rw)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		got  IOMode
		want string
	}{
		{"first", first.IO, "buffered/512"},
		{"shared", second.IO, "buffered/512"},
		{"direct", third.IO, "direct/512"},
		{"block device", blk.IO, "-"},
	} {
		if c.got.String() != c.want {
			t.Errorf("%s: IO = %s, want %s", c.name, c.got, c.want)
		}
	}
	for _, h := range m.Held() {
		if h.IO.BlockSize != 512 {
			t.Errorf("Held %s: IO = %+v, want block size 512", h.Path, h.IO)
		}
	}
}
