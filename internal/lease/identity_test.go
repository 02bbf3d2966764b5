package lease

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"xenblkd/internal/model"
)

func TestIdentity(t *testing.T) {
	sysfs := t.TempDir()
	mk := func(dev string, files map[string]string) {
		for name, v := range files {
			p := filepath.Join(sysfs, "dev/block", dev, name)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(v+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	mk("8:16", map[string]string{"device/wwid": "naa.600a0b80"})
	mk("8:16/sdb1", map[string]string{"partition": "1"})
	if err := os.Symlink("8:16/sdb1", filepath.Join(sysfs, "dev/block/8:17")); err != nil {
		t.Fatal(err)
	}
	mk("253:3", map[string]string{"dm/uuid": "mpath-3600a0b80"})
	mk("8:32", map[string]string{"serial": "S123"})
	mk("8:48", map[string]string{"size": "1"})

	cfg := &Config{
		Shares:  []Share{{Dir: "/srv/pool", Label: "pool"}, {Dir: "/mnt/nfs"}},
		Devices: []string{"/dev/sd*", "/dev/dm-*"},
		Sysfs:   sysfs,
	}
	loopDev := func(backingPath string) model.Target {
		return model.Target{Kind: model.BlockDevice, Path: "/dev/loop3", Rdev: unix.Mkdev(7, 3),
			Backing: model.FileID{Dev: 2049, Ino: 12}, BackingPath: backingPath}
	}
	blk := func(path string, major, minor uint32) model.Target {
		return model.Target{Kind: model.BlockDevice, Path: path, Rdev: unix.Mkdev(major, minor)}
	}
	for _, tc := range []struct {
		name    string
		t       model.Target
		want    string
		shared  bool
		wantErr string
	}{
		{"file under a labelled share", model.Target{Kind: model.RegularFile, Path: "/srv/pool/vm/a.img"}, "file:pool/vm/a.img", true, ""},
		{"file under a share without label", model.Target{Kind: model.RegularFile, Path: "/mnt/nfs/b.img"}, "file:/mnt/nfs/b.img", true, ""},
		{"path cleaned", model.Target{Kind: model.RegularFile, Path: "/srv/pool/x/../a.img"}, "file:pool/a.img", true, ""},
		{"local file", model.Target{Kind: model.RegularFile, Path: "/var/lib/xen/c.img"}, "", false, ""},
		{"share's sibling with a common prefix", model.Target{Kind: model.RegularFile, Path: "/srv/pool2/a.img"}, "", false, ""},
		{"the share itself", model.Target{Kind: model.RegularFile, Path: "/srv/pool"}, "", false, ""},
		{"loop device on a shared file", loopDev("/srv/pool/a.img"), "file:pool/a.img", true, ""},
		{"loop device on a local file", loopDev("/tmp/a.img"), "", false, ""},
		// Fail closed: a shared file's loop device would otherwise go unleased.
		{"loop device whose file's name is unknown: refused", loopDev(""), "", true, "cannot be judged"},
		{"disk by WWN", blk("/dev/sdb", 8, 16), "dev:wwn=naa.600a0b80", true, ""},
		{"partition", blk("/dev/sdb1", 8, 17), "dev:wwn=naa.600a0b80/part1", true, ""},
		{"multipath by dm uuid", blk("/dev/dm-3", 253, 3), "dev:dm=mpath-3600a0b80", true, ""},
		{"by serial", blk("/dev/sdc", 8, 32), "dev:serial=S123", true, ""},
		{"no identity: refused", blk("/dev/sdd", 8, 48), "", true, "no stable identity"},
		{"device not matching", blk("/dev/vdb", 254, 16), "", false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, shared, err := cfg.identity(tc.t)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want || shared != tc.shared {
				t.Fatalf("identity = %q, %v, %v; want %q, %v", got, shared, err, tc.want, tc.shared)
			}
		})
	}
}

func TestName(t *testing.T) {
	a, b := Name("file:pool/a.img"), Name("file:pool/b.img")
	if a == b || len(a) != 43 || !strings.HasPrefix(a, "xb-") {
		t.Fatalf("Name: %q, %q: want distinct 43-byte xb- names", a, b)
	}
	if Name("file:pool/a.img") != a {
		t.Fatal("Name is not stable")
	}
}

func TestSameVMAndDescribe(t *testing.T) {
	noteA := &note{Host: "hostA", HostID: 1, VM: "/vm/a", Domid: 3, Devid: 51712, Mode: "w"}
	for _, tc := range []struct {
		vm     string
		owners []owned
		want   bool
	}{
		{"/vm/a", []owned{{id: 1, note: noteA}}, true},
		{"/vm/b", []owned{{id: 1, note: noteA}}, false},
		{"", []owned{{id: 1, note: &note{HostID: 1}}}, false}, // unknown never matches
		{"/vm/a", []owned{{id: 1}}, false},                    // no note: unknown holder
		{"/vm/a", nil, false},                                 // no owner read: not a migration
		{"/vm/a", []owned{{id: 1, note: noteA}, {id: 2}}, false},
	} {
		if got := sameVM(tc.vm, tc.owners); got != tc.want {
			t.Errorf("sameVM(%q, %+v) = %v, want %v", tc.vm, tc.owners, got, tc.want)
		}
	}
	got := describe([]owned{{id: 1, note: noteA}, {id: 4}})
	want := "host hostA (sanlock host id 1), domain 3 device 51712, VM /vm/a, read-write; host 4"
	if got != want {
		t.Errorf("describe = %q, want %q", got, want)
	}
}
