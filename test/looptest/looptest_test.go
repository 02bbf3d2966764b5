package looptest_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/testenv"
	"xenblkd/test/looptest"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func image(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func backingFile(d *looptest.Device) string {
	b, _ := os.ReadFile("/sys/dev/block/" + devNum(d.Rdev) + "/loop/backing_file")
	return strings.TrimSpace(string(b))
}

func devNum(rdev uint64) string { return fmt.Sprintf("%d:%d", unix.Major(rdev), unix.Minor(rdev)) }

// TestDetach: Bind identifies its binding, Detach clears it and waits until
// the kernel has, and a second Detach (the cleanup's) does nothing.
func TestDetach(t *testing.T) {
	testenv.RequireRoot(t, "binds loop devices")
	img := image(t, "a.img")
	d := looptest.Losetup(t, img, "-r")
	if got := backingFile(d); got != img {
		t.Fatalf("%s bound to %q, want %q", d.Path, got, img)
	}
	if !d.Bound() {
		t.Fatalf("%s (diskseq %d) not Bound right after Bind", d.Path, d.DiskSeq)
	}
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	if d.Bound() {
		t.Fatalf("%s still bound after Detach returned", d.Path)
	}
	if err := d.Detach(); err != nil {
		t.Fatalf("second Detach: %v", err)
	}
}

// TestDetachWaitsForOpener: a device another opener holds is cleared at its
// close (losetup -d sets AUTOCLEAR); Detach returns once that happened.
func TestDetachWaitsForOpener(t *testing.T) {
	testenv.RequireRoot(t, "binds loop devices")
	d := looptest.Losetup(t, image(t, "held.img"))
	f, err := os.Open(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- d.Detach() }()
	// Close once Detach has marked the device: AUTOCLEAR shows in sysfs.
	autoclear := "/sys/dev/block/" + devNum(d.Rdev) + "/loop/autoclear"
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(time.Millisecond) {
		if b, _ := os.ReadFile(autoclear); strings.TrimSpace(string(b)) == "1" {
			break
		}
		if time.Now().After(deadline) {
			f.Close()
			t.Fatalf("%s never marked AUTOCLEAR by Detach", d.Path)
		}
	}
	f.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(40 * time.Second):
		t.Fatal("Detach did not return after the last opener closed")
	}
	if d.Bound() {
		t.Fatalf("%s still bound after Detach returned", d.Path)
	}
}

// TestStaleDetachLeavesTheNewBinding: after a device was detached, a Device
// still naming its slot must not detach what another test bound there since
// (the double `losetup -d` that once detached another package's disk).
func TestStaleDetachLeavesTheNewBinding(t *testing.T) {
	testenv.RequireRoot(t, "binds loop devices")
	first, second := image(t, "first.img"), image(t, "second.img")
	var old *looptest.Device
	for deadline := time.Now().Add(20 * time.Second); ; {
		d, err := looptest.Bind(first)
		if err != nil {
			t.Fatal(err)
		}
		stale := &looptest.Device{Path: d.Path, Rdev: d.Rdev, DiskSeq: d.DiskSeq}
		if err := d.Detach(); err != nil {
			t.Fatal(err)
		}
		// Bind the same slot again, to another file, as `losetup -f` of
		// another test would; someone may take the slot first: try again.
		if out, err := exec.Command("losetup", d.Path, second).CombinedOutput(); err == nil {
			old = stale
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("losetup %s %s: %v: %s", d.Path, second, err, out)
		}
	}
	// The new binding, as a Device, so that the test detaches it at the end.
	f, err := os.Open(old.Path)
	if err != nil {
		t.Fatal(err)
	}
	seq, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETDISKSEQ)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	current := &looptest.Device{Path: old.Path, Rdev: old.Rdev, DiskSeq: seq}
	t.Cleanup(func() {
		if err := current.Detach(); err != nil {
			t.Error(err)
		}
	})
	if seq == old.DiskSeq {
		t.Fatalf("%s: the new binding has the old diskseq %d", old.Path, seq)
	}

	if err := old.Detach(); err != nil {
		t.Fatalf("stale Detach: %v", err)
	}
	if got := backingFile(current); got != second || !current.Bound() {
		t.Fatalf("a stale Detach of %s (diskseq %d) cleared the new binding (diskseq %d): backing file now %q", old.Path, old.DiskSeq, seq, got)
	}
}
