package daemon

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"xenblkd/internal/loop"
	"xenblkd/internal/testenv"
)

func TestChooseIO(t *testing.T) {
	ext4 := loop.BackingInfo{FSType: unix.EXT4_SUPER_MAGIC, DirectIOAlign: 512}
	ext4on4Kn := loop.BackingInfo{FSType: unix.EXT4_SUPER_MAGIC, DirectIOAlign: 4096}
	xfs := loop.BackingInfo{FSType: unix.XFS_SUPER_MAGIC, DirectIOAlign: 512}
	btrfs := loop.BackingInfo{FSType: unix.BTRFS_SUPER_MAGIC, DirectIOAlign: 512}
	btrfsNoCOW := loop.BackingInfo{FSType: unix.BTRFS_SUPER_MAGIC, DirectIOAlign: 512, NoCOW: true}
	tmpfs := loop.BackingInfo{FSType: unix.TMPFS_MAGIC, DirectIOAlign: 512}
	nfs := loop.BackingInfo{FSType: unix.NFS_SUPER_MAGIC, DirectIOAlign: 512}
	noDIO := loop.BackingInfo{FSType: unix.EXT4_SUPER_MAGIC}
	auto, on, off := IOPolicy{}, IOPolicy{DirectIO: DirectIOOn}, IOPolicy{DirectIO: DirectIOOff}
	tests := []struct {
		name       string
		policy     IOPolicy
		disk       diskIO
		info       loop.BackingInfo
		wantDIO    bool
		wantBS     uint32
		wantReason string // a substring
	}{
		{"auto ext4", auto, diskIO{}, ext4, true, 512, "--direct-io=auto: ext4"},
		{"auto xfs", auto, diskIO{}, xfs, true, 512, "xfs"},
		{"auto btrfs checksummed", auto, diskIO{}, btrfs, false, 512, "chattr +C"},
		{"auto btrfs nocow", auto, diskIO{}, btrfsNoCOW, true, 512, "NOCOW"},
		{"auto tmpfs", auto, diskIO{}, tmpfs, false, 512, "tmpfs"},
		{"auto unknown fs", auto, diskIO{}, nfs, false, 512, "not measured"},
		{"auto 4Kn keeps 512 buffered", auto, diskIO{}, ext4on4Kn, false, 512, "user.xenblkd.block-size=4096"},
		{"auto 4Kn with 4096 configured", auto, diskIO{BlockSize: 4096}, ext4on4Kn, true, 4096, "ext4"},
		{"auto no dio on file", auto, diskIO{}, noDIO, false, 512, "cannot do direct I/O"},
		{"on btrfs warns", on, diskIO{}, btrfs, true, 512, "warning"},
		{"on tmpfs", on, diskIO{}, tmpfs, true, 512, "--direct-io=on"},
		{"on 4Kn still buffered", on, diskIO{}, ext4on4Kn, false, 512, "4096-byte sectors"},
		{"off ext4", off, diskIO{}, ext4, false, 512, "--direct-io=off"},
		{"disk off wins over on", on, diskIO{DirectIO: DirectIOOff}, ext4, false, 512, "user.xenblkd.direct-io=off"},
		{"disk on wins over off", off, diskIO{DirectIO: DirectIOOn}, tmpfs, true, 512, "user.xenblkd.direct-io=on"},
		{"disk auto wins over off", off, diskIO{DirectIO: DirectIOAuto}, xfs, true, 512, "user.xenblkd.direct-io=auto"},
		{"disk block size with off", off, diskIO{BlockSize: 4096}, ext4, false, 4096, "off"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := chooseIO(tt.policy, tt.disk, tt.info)
			if got.DirectIO != tt.wantDIO || got.BlockSize != tt.wantBS || !strings.Contains(got.Reason, tt.wantReason) {
				t.Errorf("chooseIO = %+v, want direct %v, block size %d, reason containing %q",
					got, tt.wantDIO, tt.wantBS, tt.wantReason)
			}
		})
	}
}

func TestParseDirectIO(t *testing.T) {
	for _, s := range []string{"auto", "on", "off"} {
		if d, err := ParseDirectIO(s); err != nil || string(d) != s {
			t.Errorf("ParseDirectIO(%q) = %q, %v", s, d, err)
		}
	}
	for _, s := range []string{"", "yes", "ON", "direct"} {
		if _, err := ParseDirectIO(s); err == nil {
			t.Errorf("ParseDirectIO(%q): no error", s)
		}
	}
}

// TestReadDiskIO reads real extended attributes of a file in the test's
// directory (user xattrs: ext4, XFS, Btrfs, tmpfs since 6.6).
func TestReadDiskIO(t *testing.T) {
	tests := []struct {
		name    string
		attrs   map[string]string
		want    diskIO
		wantErr string
	}{
		{"none", nil, diskIO{}, ""},
		{"off", map[string]string{xattrDirectIO: "off"}, diskIO{DirectIO: DirectIOOff}, ""},
		{"on and 4096", map[string]string{xattrDirectIO: "on", xattrBlockSize: "4096"}, diskIO{DirectIO: DirectIOOn, BlockSize: 4096}, ""},
		{"bad mode", map[string]string{xattrDirectIO: "yes"}, diskIO{}, `user.xenblkd.direct-io direct I/O setting "yes"`},
		{"bad size", map[string]string{xattrBlockSize: "1000"}, diskIO{}, `user.xenblkd.block-size="1000"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "disk.img")
			if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
			for k, v := range tt.attrs {
				if err := unix.Setxattr(path, k, []byte(v), 0); err != nil {
					testenv.Skipf(t, "no user xattrs here: %v", err)
				}
			}
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			got, err := readDiskIO(f)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("readDiskIO: err %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("readDiskIO = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

// TestIntegrationHostIOMode: the real host binds a loop device on this
// machine's file system with the I/O mode the policy chose, and a per-disk
// attribute wins over the daemon's setting.
func TestIntegrationHostIOMode(t *testing.T) {
	testenv.RequireRoot(t, "creates loop devices")
	tests := []struct {
		name    string
		policy  IOPolicy
		attr    string // user.xenblkd.direct-io, if set
		wantDIO bool
	}{
		{"off", IOPolicy{DirectIO: DirectIOOff}, "", false},
		{"on", IOPolicy{DirectIO: DirectIOOn}, "", true},
		{"disk off wins", IOPolicy{DirectIO: DirectIOOn}, "off", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "disk.img")
			if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			if tt.attr != "" {
				if err := unix.Setxattr(path, xattrDirectIO, []byte(tt.attr), 0); err != nil {
					testenv.Skipf(t, "no user xattrs here: %v", err)
				}
			}
			backing, err := loop.OpenBacking(path, false)
			if err != nil {
				t.Fatal(err)
			}
			defer backing.Close()
			h := loopHost{tag: "xenblkd-test:host-io", io: tt.policy, log: slog.New(slog.DiscardHandler)}
			info, _ := loop.InspectBacking(backing)
			dev, err := h.NewLoop(backing, false)
			if err != nil {
				t.Fatal(err)
			}
			defer dev.Close()
			want := tt.wantDIO && info.DirectIOAlign == 512 // this machine's disk may be 4Kn
			if dev.DirectIO() != want || dev.BlockSize() != 512 {
				t.Errorf("DirectIO, BlockSize = %v, %d; want %v, 512", dev.DirectIO(), dev.BlockSize(), want)
			}
		})
	}
}
