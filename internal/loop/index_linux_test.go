package loop_test

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"xenblkd/internal/loop"
	"xenblkd/test/looptest"
)

func newIndex(t testing.TB) *loop.Index {
	t.Helper()
	ix, err := loop.NewIndex()
	if err != nil {
		t.Fatalf("NewIndex: %v", err)
	}
	t.Cleanup(func() { ix.Close() })
	return ix
}

// trust makes ix answer from memory: it must have seen the uevent of d's bind.
func trust(t testing.TB, ix *loop.Index, d *loop.Device) {
	t.Helper()
	if !ix.SawAttach(d) {
		t.Fatalf("the index saw no uevent for binding %s (diskseq %d)", d.Path(), d.DiskSeq())
	}
}

// losetupDetach detaches d (bound by looptest) and fails t if it cannot.
func losetupDetach(t testing.TB, d *looptest.Device) {
	t.Helper()
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
}

func paths(bs []loop.Binding) []string {
	var p []string
	for _, b := range bs {
		p = append(p, b.Path)
	}
	return p
}

// TestIntegrationIndex: the index answers like FindByBacking, at once after
// each bind and clear, whoever made it (this package, losetup).
func TestIntegrationIndex(t *testing.T) {
	requireRoot(t)
	ix := newIndex(t)
	path := sparseFile(t, 1<<20)
	id := backingID(t, openBacking(t, path, true))

	// Before it is trusted the index scans: a device bound before it is found.
	foreign := looptest.Losetup(t, path)
	check := func(step string, skip func(string) bool, want ...string) {
		t.Helper()
		got, err := ix.FindByBacking(id, skip)
		if err != nil {
			t.Fatalf("%s: FindByBacking: %v", step, err)
		}
		if !slices.Equal(paths(got), want) {
			t.Errorf("%s: FindByBacking = %v, want %v", step, paths(got), want)
		}
		scan, err := loop.FindByBacking(id, skip)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, scan) {
			t.Errorf("%s: index %+v, scan %+v", step, got, scan)
		}
	}
	check("untrusted", nil, foreign.Path)

	ours := attach(t, path, loop.Options{ReadOnly: true})
	trust(t, ix, ours)
	both := []string{foreign.Path, ours.Path()}
	slices.SortFunc(both, func(a, b string) int { return devNumber(a) - devNumber(b) })
	check("after our attach", nil, both...)
	check("ours skipped", func(p string) bool { return p == ours.Path() }, foreign.Path)

	losetupDetach(t, foreign)
	check("after losetup -d", nil, ours.Path())

	again := looptest.Losetup(t, path, "-r")
	both = []string{again.Path, ours.Path()}
	slices.SortFunc(both, func(a, b string) int { return devNumber(a) - devNumber(b) })
	check("after a second losetup", nil, both...)
	losetupDetach(t, again)

	number, seq := ours.Number(), ours.DiskSeq()
	ours.Close() // AUTOCLEAR
	waitCleared(t, number, seq)
	check("after autoclear", nil)
	if n := ix.Rescans(); n != 1 {
		t.Errorf("%d full scans, want 1 (at start)", n)
	}
}

func devNumber(path string) int {
	var n int
	fmt.Sscanf(path, "/dev/loop%d", &n)
	return n
}

// TestIntegrationIndexChangeFD: LOOP_CHANGE_FD moves a read-only device to
// another backing file; the index follows.
func TestIntegrationIndexChangeFD(t *testing.T) {
	requireRoot(t)
	ix := newIndex(t)
	first, second := sparseFile(t, 1<<20), sparseFile(t, 1<<20)
	firstID := backingID(t, openBacking(t, first, true))
	secondFile := openBacking(t, second, true)
	secondID := backingID(t, secondFile)
	d := attach(t, first, loop.Options{ReadOnly: true})
	trust(t, ix, d)

	const loopChangeFD = 0x4C06 // LOOP_CHANGE_FD, include/uapi/linux/loop.h
	if err := unix.IoctlSetInt(d.Fd(), loopChangeFD, int(secondFile.Fd())); err != nil {
		t.Fatalf("LOOP_CHANGE_FD: %v", err)
	}
	if got, err := ix.FindByBacking(firstID, nil); err != nil || len(got) != 0 {
		t.Errorf("old backing file: %v, %v; want none", paths(got), err)
	}
	got, err := ix.FindByBacking(secondID, nil)
	if err != nil || len(got) != 1 || got[0].Path != d.Path() || got[0].Backing != secondID {
		t.Errorf("new backing file: %+v, %v; want %s", got, err, d.Path())
	}
}

// TestIntegrationIndexOverflow: events dropped by a full socket (ENOBUFS)
// are made up for by a rescan before the next answer.
func TestIntegrationIndexOverflow(t *testing.T) {
	requireRoot(t)
	ix := newIndex(t)
	path := sparseFile(t, 1<<20)
	id := backingID(t, openBacking(t, path, true))
	// Trusted first, with the normal buffer: other tests' events on this
	// host would overflow the small one before our own bind's event came.
	trust(t, ix, attach(t, path, loop.Options{ReadOnly: true}))
	if err := ix.ShrinkRcvBuf(); err != nil {
		t.Fatal(err)
	}

	resume := ix.Pause()
	other := sparseFile(t, 1<<20)
	for range 20 { // each bind and clear is 1-2 events
		d := attach(t, other, loop.Options{ReadOnly: true})
		number, seq := d.Number(), d.DiskSeq()
		d.Close()
		waitCleared(t, number, seq)
	}
	foreign := looptest.Losetup(t, path, "-r").Path
	resume()
	got, err := ix.FindByBacking(id, func(p string) bool { return p != foreign })
	if err != nil || !slices.Equal(paths(got), []string{foreign}) {
		t.Errorf("after overflow: %v, %v; want [%s]", paths(got), err, foreign)
	}
	if n := ix.Rescans(); n < 2 {
		t.Errorf("%d full scans: the overflow caused none", n)
	}
}

// TestIntegrationIndexRace: binds and clears in parallel with lookups. A
// lookup that starts after Attach returned and before Close must name the
// device, with its diskseq; one after the clear must not.
func TestIntegrationIndexRace(t *testing.T) {
	requireRoot(t)
	ix := newIndex(t)
	const workers, rounds = 4, 25
	seed := attach(t, sparseFile(t, 1<<20), loop.Options{ReadOnly: true})
	trust(t, ix, seed)
	files := make([]string, workers)
	ids := make([]loop.FileID, workers)
	for i := range files {
		files[i] = sparseFile(t, 1<<20)
		ids[i] = backingID(t, openBacking(t, files[i], true))
	}
	stop := make(chan struct{})
	var lookups sync.WaitGroup
	lookups.Go(func() { // contention: lookups of every file all along
		for {
			select {
			case <-stop:
				return
			default:
			}
			for _, id := range ids {
				if _, err := ix.FindByBacking(id, nil); err != nil {
					t.Error(err)
					return
				}
			}
		}
	})
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for r := range rounds {
				f, err := loop.OpenBacking(files[w], r%2 == 0)
				if err != nil {
					t.Error(err)
					return
				}
				d, err := loop.Attach(f, loop.Options{ReadOnly: r%2 == 0, Tag: testTag(t)})
				f.Close()
				if err != nil {
					t.Error(err)
					return
				}
				got, err := ix.FindByBacking(ids[w], nil)
				if err != nil || len(got) != 1 || got[0].Path != d.Path() || got[0].DiskSeq != d.DiskSeq() {
					t.Errorf("worker %d round %d: held %s (diskseq %d), index says %+v, %v", w, r, d.Path(), d.DiskSeq(), got, err)
				}
				number, seq := d.Number(), d.DiskSeq()
				d.Close()
				waitCleared(t, number, seq)
				if got, err := ix.FindByBacking(ids[w], nil); err != nil || len(got) != 0 {
					t.Errorf("worker %d round %d: after the clear of %s the index says %+v, %v", w, r, d.Path(), got, err)
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	lookups.Wait()
}

func TestParseLoopUevent(t *testing.T) {
	msg := func(fields ...string) []byte { return []byte(strings.Join(fields, "\x00") + "\x00") }
	for _, tc := range []struct {
		name   string
		msg    []byte
		number int
		seq    uint64
		ok     bool
	}{
		{"configure", msg("change@/devices/virtual/block/loop7", "ACTION=change", "DEVPATH=/devices/virtual/block/loop7",
			"SUBSYSTEM=block", "MAJOR=7", "MINOR=7", "DEVNAME=loop7", "DEVTYPE=disk", "DISKSEQ=8831", "SEQNUM=5"), 7, 8831, true},
		{"add", msg("add@/devices/virtual/block/loop4321", "ACTION=add", "SUBSYSTEM=block", "DEVNAME=loop4321", "DEVTYPE=disk", "DISKSEQ=9"), 4321, 9, true},
		{"no diskseq (< 5.15)", msg("change@/x", "SUBSYSTEM=block", "DEVNAME=loop0", "DEVTYPE=disk"), 0, 0, true},
		{"partition", msg("add@/x", "SUBSYSTEM=block", "DEVNAME=loop0p1", "DEVTYPE=partition"), 0, 0, false},
		{"other disk", msg("change@/x", "SUBSYSTEM=block", "DEVNAME=sda", "DEVTYPE=disk"), 0, 0, false},
		{"other subsystem", msg("change@/x", "SUBSYSTEM=bdi", "DEVNAME=loop0", "DEVTYPE=disk"), 0, 0, false},
		{"libudev", msg("libudev", "SUBSYSTEM=block", "DEVNAME=loop0", "DEVTYPE=disk"), 0, 0, false},
		{"not a number", msg("change@/x", "SUBSYSTEM=block", "DEVNAME=loopx", "DEVTYPE=disk"), 0, 0, false},
		{"bare loop", msg("change@/x", "SUBSYSTEM=block", "DEVNAME=loop", "DEVTYPE=disk"), 0, 0, false},
		{"huge", msg("change@/x", "SUBSYSTEM=block", "DEVNAME=loop99999999999", "DEVTYPE=disk"), 0, 0, false},
		{"empty", nil, 0, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			number, seq, ok := loop.ParseLoopUevent(tc.msg)
			if number != tc.number || seq != tc.seq || ok != tc.ok {
				t.Errorf("got %d, %d, %v; want %d, %d, %v", number, seq, ok, tc.number, tc.seq, tc.ok)
			}
		})
	}
}

func FuzzParseLoopUevent(f *testing.F) {
	f.Add([]byte("change@/devices/virtual/block/loop0\x00ACTION=change\x00SUBSYSTEM=block\x00DEVNAME=loop0\x00DEVTYPE=disk\x00DISKSEQ=1\x00"))
	f.Add([]byte("libudev\x00"))
	f.Fuzz(func(t *testing.T, msg []byte) {
		number, _, ok := loop.ParseLoopUevent(msg)
		if ok && (number < 0 || !strings.Contains(string(msg), "\x00DEVNAME=loop") || !strings.Contains(string(msg), "\x00SUBSYSTEM=block")) {
			t.Errorf("ParseLoopUevent(%q) = %d, true", msg, number)
		}
	})
}
