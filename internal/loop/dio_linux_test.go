package loop_test

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"xenblkd/internal/loop"
	"xenblkd/internal/testenv"
	"xenblkd/test/scratchfs"
)

// scratch makes a scratch file system for one test, skipping if this
// machine cannot make that kind.
func scratch(t *testing.T, kind string, sectorSize uint32) *scratchfs.FS {
	t.Helper()
	requireRoot(t)
	if err := scratchfs.Available(kind); err != nil {
		testenv.Skip(t, err.Error())
	}
	fs, err := scratchfs.Make(t.TempDir(), kind, 0, sectorSize)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fs.Close(); err != nil {
			t.Errorf("close scratch %s: %v", kind, err)
		}
	})
	return fs
}

// imageOn creates a sparse image file on fs (NOCOW first if asked).
func imageOn(t *testing.T, fs *scratchfs.FS, nocow bool) string {
	t.Helper()
	path := filepath.Join(fs.Dir, "disk.img")
	if nocow {
		if err := scratchfs.SetNoCOW(path); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(path, nil, 0o600); err != nil && !nocow {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 16<<20); err != nil {
		t.Fatal(err)
	}
	return path
}

// sysfsDIO reads /sys/block/loopN/loop/dio.
func sysfsDIO(t *testing.T, d *loop.Device) bool {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(d.Path()), "loop/dio"))
	if err != nil {
		t.Fatal(err)
	}
	return string(b) == "1\n"
}

// TestIntegrationDirectIO configures devices on real file systems, made in
// image files on loop devices of 512- and 4096-byte sectors, and checks the
// I/O mode the device reports against the kernel's own view (sysfs dio,
// BLKSSZGET), through LOOP_CONFIGURE and the pre-5.8 path.
func TestIntegrationDirectIO(t *testing.T) {
	tests := []struct {
		name       string
		kind       string
		sectorSize uint32 // of the disk the file system is on
		opts       loop.Options
		wantDIO    bool
		wantAlign  uint32 // InspectBacking's DirectIOAlign
	}{
		{"ext4 direct", "ext4", 512, loop.Options{DirectIO: true}, true, 512},
		{"ext4 buffered", "ext4", 512, loop.Options{}, false, 512},
		// A 4Kn disk: the kernel silently refuses direct I/O at 512-byte
		// sectors; LOOP_CONFIGURE still succeeds and the device is buffered.
		{"ext4 on 4Kn, 512 asked", "ext4", 4096, loop.Options{DirectIO: true}, false, 4096},
		{"ext4 on 4Kn, 4096 asked", "ext4", 4096, loop.Options{DirectIO: true, BlockSize: 4096}, true, 4096},
		{"xfs direct", "xfs", 512, loop.Options{DirectIO: true}, true, 512},
		{"xfs on 4Kn, 512 asked", "xfs", 4096, loop.Options{DirectIO: true}, false, 4096},
		{"btrfs direct", "btrfs", 512, loop.Options{DirectIO: true}, true, 512},
		{"btrfs buffered", "btrfs", 512, loop.Options{}, false, 512},
	}
	for _, legacy := range []bool{false, true} {
		for _, tt := range tests {
			name := tt.name
			if legacy {
				name += " (legacy)"
			}
			t.Run(name, func(t *testing.T) {
				fs := scratch(t, tt.kind, tt.sectorSize)
				path := imageOn(t, fs, false)
				backing := openBacking(t, path, false)
				info, err := loop.InspectBacking(backing)
				if err != nil {
					t.Fatal(err)
				}
				if info.DirectIOAlign != tt.wantAlign {
					t.Errorf("DirectIOAlign = %d, want %d", info.DirectIOAlign, tt.wantAlign)
				}
				tt.opts.Tag = testTag(t)
				attachFn := loop.Attach
				if legacy {
					attachFn = loop.AttachLegacy
				}
				d, err := attachFn(backing, tt.opts)
				if err != nil {
					t.Fatalf("Attach: %v", err)
				}
				t.Cleanup(func() { d.Close() })
				wantBS := max(tt.opts.BlockSize, 512)
				if d.DirectIO() != tt.wantDIO || d.BlockSize() != wantBS {
					t.Errorf("DirectIO, BlockSize = %v, %d; want %v, %d", d.DirectIO(), d.BlockSize(), tt.wantDIO, wantBS)
				}
				if got := sysfsDIO(t, d); got != d.DirectIO() {
					t.Errorf("sysfs dio = %v, DirectIO() = %v", got, d.DirectIO())
				}
				if got, err := unix.IoctlGetInt(d.Fd(), unix.BLKSSZGET); err != nil || uint32(got) != wantBS {
					t.Errorf("BLKSSZGET = %d (%v), want %d", got, err, wantBS)
				}
				// An adopted device reports the same mode.
				fd, err := unix.Dup(d.Fd())
				if err != nil {
					t.Fatal(err)
				}
				adopted, err := loop.Adopt(fd)
				if err != nil {
					unix.Close(fd)
					t.Fatal(err)
				}
				t.Cleanup(func() { adopted.Close() })
				if adopted.DirectIO() != d.DirectIO() || adopted.BlockSize() != d.BlockSize() {
					t.Errorf("adopted: DirectIO, BlockSize = %v, %d; want %v, %d",
						adopted.DirectIO(), adopted.BlockSize(), d.DirectIO(), d.BlockSize())
				}
			})
		}
	}
}

// TestIntegrationInspectBacking checks the facts the I/O policy decides on.
func TestIntegrationInspectBacking(t *testing.T) {
	tests := []struct {
		kind   string
		nocow  bool
		fsType int64
	}{
		{"ext4", false, unix.EXT4_SUPER_MAGIC},
		{"xfs", false, unix.XFS_SUPER_MAGIC},
		{"btrfs", false, unix.BTRFS_SUPER_MAGIC},
		{"btrfs", true, unix.BTRFS_SUPER_MAGIC},
		{"tmpfs", false, unix.TMPFS_MAGIC},
	}
	for _, tt := range tests {
		name := tt.kind
		if tt.nocow {
			name += " nocow"
		}
		t.Run(name, func(t *testing.T) {
			fs := scratch(t, tt.kind, 512)
			backing := openBacking(t, imageOn(t, fs, tt.nocow), false)
			info, err := loop.InspectBacking(backing)
			if err != nil {
				t.Fatal(err)
			}
			if info.FSType != tt.fsType || info.NoCOW != tt.nocow {
				t.Errorf("InspectBacking = %+v, want FSType %#x NoCOW %v", info, tt.fsType, tt.nocow)
			}
			// Whatever the kernel decides, the device reports it as sysfs does.
			d, err := loop.Attach(backing, loop.Options{DirectIO: true, Tag: testTag(t)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { d.Close() })
			if got := sysfsDIO(t, d); got != d.DirectIO() {
				t.Errorf("sysfs dio = %v, DirectIO() = %v", got, d.DirectIO())
			}
			t.Logf("%s: %+v, direct I/O in effect: %v", name, info, d.DirectIO())
		})
	}
	t.Run("block device", func(t *testing.T) {
		fs := scratch(t, "ext4", 4096)
		f, err := os.OpenFile(fs.Device.Path(), os.O_RDONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		info, err := loop.InspectBacking(f)
		if err != nil {
			t.Fatal(err)
		}
		if info != (loop.BackingInfo{DirectIOAlign: 4096}) {
			t.Errorf("InspectBacking(%s) = %+v, want DirectIOAlign 4096 only", fs.Device.Path(), info)
		}
	})
}

// TestIntegrationODirectBackingBuffered: the kernel turns direct I/O on by
// itself for an O_DIRECT backing fd; a device asked to be buffered is
// switched back and says so.
func TestIntegrationODirectBackingBuffered(t *testing.T) {
	fs := scratch(t, "ext4", 512)
	path := imageOn(t, fs, false)
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	d, err := loop.Attach(f, loop.Options{Tag: testTag(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	if d.DirectIO() || sysfsDIO(t, d) {
		t.Errorf("DirectIO() = %v, sysfs dio = %v; want both off", d.DirectIO(), sysfsDIO(t, d))
	}
}
