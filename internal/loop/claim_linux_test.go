package loop_test

import (
	"errors"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"xenblkd/internal/loop"
	"xenblkd/test/looptest"
)

// losetupStock binds path as the stock block script does (`losetup DEV FILE`:
// no AUTOCLEAR, lo_file_name = the path) and returns the device number. At
// cleanup the device is detached only while it still carries this binding.
func losetupStock(t *testing.T, path string, readOnly bool) int {
	t.Helper()
	var args []string
	if readOnly {
		args = []string{"-r"}
	}
	dev := looptest.Losetup(t, path, args...).Path
	n, err := strconv.Atoi(strings.TrimPrefix(dev, "/dev/loop"))
	if err != nil {
		t.Fatalf("losetup printed %q", dev)
	}
	return n
}

func TestIntegrationClaim(t *testing.T) {
	requireRoot(t)
	for _, readOnly := range []bool{false, true} {
		t.Run("readonly="+strconv.FormatBool(readOnly), func(t *testing.T) {
			path := sparseFile(t, 1<<20)
			f := openBacking(t, path, true)
			want := backingID(t, f)
			number := losetupStock(t, path, readOnly)
			seq, _ := sysfsDiskSeq(t, number)

			// A wrong file is refused and leaves the device as it was.
			if _, err := loop.Claim(number, loop.FileID{Dev: want.Dev, Ino: want.Ino + 1}, "x"); !errors.Is(err, loop.ErrBindingChanged) {
				t.Fatalf("Claim with the wrong file: %v, want ErrBindingChanged", err)
			}

			// blkback's stand-in: a second opener, as a guest's running backend.
			vm, err := unix.Open("/dev/loop"+strconv.Itoa(number), unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				if vm >= 0 {
					unix.Close(vm)
				}
			}()
			tag := testTag(t)
			d, err := loop.Claim(number, want, tag)
			if err != nil {
				t.Fatalf("Claim: %v", err)
			}
			defer d.Close()
			if d.Flags()&unix.LO_FLAGS_AUTOCLEAR == 0 || d.Tag() != tag || d.DiskSeq() != seq || d.Backing() != want {
				t.Fatalf("claimed: flags %#x tag %q diskseq %d backing %v; want AUTOCLEAR, %q, %d, %v",
					d.Flags(), d.Tag(), d.DiskSeq(), d.Backing(), tag, seq, want)
			}
			if d.ReadOnly() != readOnly {
				t.Fatalf("read-only %v after Claim, want %v (flags %#x)", d.ReadOnly(), readOnly, d.Flags())
			}
			if err := d.Verify(); err != nil {
				t.Fatalf("Verify after Claim: %v", err)
			}
			// The data path still works through the second opener.
			buf := make([]byte, 512)
			if _, err := unix.Pread(vm, buf, 0); err != nil {
				t.Fatalf("read through the device after Claim: %v", err)
			}
			// Our close keeps it for the other opener; its close frees it.
			d.Close()
			if now, ok := sysfsDiskSeq(t, number); !ok || now != seq {
				t.Fatalf("loop%d freed while still open elsewhere (diskseq %d, exists %v)", number, now, ok)
			}
			unix.Close(vm)
			vm = -1
			waitCleared(t, number, seq)
		})
	}
}
