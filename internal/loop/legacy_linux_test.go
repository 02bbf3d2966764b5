package loop

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/testenv"
)

// TestIntegrationLegacyConfigure runs the pre-5.8 path (LOOP_SET_FD +
// LOOP_SET_STATUS64) on the running kernel: the result must be the same
// binding LOOP_CONFIGURE makes, and it must clear on Close.
func TestIntegrationLegacyConfigure(t *testing.T) {
	testenv.RequireRoot(t, "creates loop devices")
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		opts      Options
		wantFlags uint32
	}{
		{"read-write", Options{}, unix.LO_FLAGS_AUTOCLEAR},
		{"read-only", Options{ReadOnly: true}, unix.LO_FLAGS_AUTOCLEAR | unix.LO_FLAGS_READ_ONLY},
		{"block size 4096", Options{BlockSize: 4096}, unix.LO_FLAGS_AUTOCLEAR},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.Tag = fmt.Sprintf("xenblkd-test:%d:legacy:%s", os.Getpid(), tt.name)
			backing, err := OpenBacking(path, tt.opts.ReadOnly)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { backing.Close() })
			d, err := attach(backing, tt.opts, true)
			if err != nil {
				t.Fatalf("attach (legacy): %v", err)
			}
			t.Cleanup(func() { d.Close() })

			if got := d.Flags(); got != tt.wantFlags {
				t.Errorf("Flags() = %#x, want %#x", got, tt.wantFlags)
			}
			if d.Tag() != tt.opts.Tag {
				t.Errorf("Tag() = %q, want %q", d.Tag(), tt.opts.Tag)
			}
			wantBS := max(tt.opts.BlockSize, 512)
			if got, err := unix.IoctlGetInt(d.Fd(), unix.BLKSSZGET); err != nil || uint32(got) != wantBS {
				t.Errorf("logical block size = %d (%v), want %d", got, err, wantBS)
			}
			if err := d.Verify(); err != nil {
				t.Errorf("Verify: %v", err)
			}
			number, seq := d.Number(), d.DiskSeq()
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			// Cleared by AUTOCLEAR (set by LOOP_SET_STATUS64): the old
			// binding goes, whoever holds loopN next. The wait is for udev,
			// which may hold the device briefly on a real system.
			for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(time.Millisecond) {
				d2, err := Open(number, seq)
				if err != nil {
					break
				}
				d2.Close()
				if time.Now().After(deadline) {
					t.Fatalf("loop%d (diskseq %d) still bound after Close", number, seq)
				}
			}
		})
	}
}
