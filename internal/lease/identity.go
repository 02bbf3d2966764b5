package lease

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"xenblkd/internal/model"
)

// Share is a directory on shared storage (an NFS mount, a cluster file
// system): every file under it is a shared target. Label names the share the
// same way on every host, so hosts that mount it at different places still
// compute the same identity; it defaults to Dir.
type Share struct {
	Dir   string
	Label string
}

// identity returns the stable identity of t, the same on every host, and
// whether t is shared at all (false: a local target, no lease). A file under
// a share is "file:LABEL/REL"; a block device matching a device pattern is
// "dev:" + its WWN, or its dm UUID, or its serial (a partition adds "/partN");
// a loop device is judged by its backing file.
func (c *Config) identity(t model.Target) (string, bool, error) {
	path := t.Path
	if t.Kind == model.BlockDevice && t.Backing != (model.FileID{}) {
		// A loop device: what it stands for is its file, judged by name.
		if t.BackingPath == "" && len(c.Shares) > 0 {
			return "", true, fmt.Errorf("loop device %s: the name of the file bound to it could not be read "+
				"(sysfs loop/backing_file), so whether it is on shared storage cannot be judged; "+
				"give the guest the image file itself", t.Path)
		}
		path = t.BackingPath
	}
	if t.Kind == model.RegularFile || t.BackingPath != "" {
		for _, s := range c.Shares {
			rel, err := filepath.Rel(s.Dir, filepath.Clean(path))
			if err != nil || rel == ".." || strings.HasPrefix(rel, "../") || rel == "." {
				continue
			}
			label := s.Label
			if label == "" {
				label = s.Dir
			}
			return "file:" + label + "/" + rel, true, nil
		}
		return "", false, nil
	}
	if !c.matchesDevice(t.Path) {
		return "", false, nil
	}
	id, err := blockIdentity(c.sysfs(), t.Rdev)
	if err != nil {
		return "", true, fmt.Errorf("%s matches --cluster-devices but has no stable identity every host can compute: %w; "+
			"take it out of the pattern or give it a WWN (multipath, by-id)", t.Path, err)
	}
	return "dev:" + id, true, nil
}

func (c *Config) matchesDevice(path string) bool {
	for _, p := range c.Devices {
		if ok, _ := filepath.Match(p, path); ok {
			return true
		}
	}
	return false
}

func (c *Config) sysfs() string {
	if c.Sysfs != "" {
		return c.Sysfs
	}
	return "/sys"
}

// blockIdentity reads the identity of block device rdev from sysfs: the
// SCSI/NVMe WWN (wwid), a device-mapper UUID (multipath: mpath-<wwid>),
// or the serial, in that order; a partition is its whole disk's plus
// "/part<N>".
func blockIdentity(sysfs string, rdev uint64) (string, error) {
	dir := fmt.Sprintf("%s/dev/block/%d:%d", sysfs, unix.Major(rdev), unix.Minor(rdev))
	if part, err := os.ReadFile(dir + "/partition"); err == nil {
		whole, err := filepath.EvalSymlinks(dir + "/..")
		if err != nil {
			return "", err
		}
		id, err := identityIn(whole)
		if err != nil {
			return "", err
		}
		return id + "/part" + strings.TrimSpace(string(part)), nil
	}
	return identityIn(dir)
}

func identityIn(dir string) (string, error) {
	for _, f := range []struct{ file, kind string }{
		{"wwid", "wwn"}, {"device/wwid", "wwn"}, {"dm/uuid", "dm"}, {"serial", "serial"}, {"device/serial", "serial"},
	} {
		b, err := os.ReadFile(filepath.Join(dir, f.file))
		if v := strings.TrimSpace(string(b)); err == nil && v != "" {
			return f.kind + "=" + v, nil
		}
	}
	return "", fmt.Errorf("none of wwid, device/wwid, dm/uuid, serial, device/serial in %s", dir)
}

// Name is the sanlock resource name of an identity: "xb-" and the first 40
// hex digits of its SHA-256 (sanlock names are at most 48 bytes, and an
// identity may be longer and hold any byte).
func Name(identity string) string {
	sum := sha256.Sum256([]byte(identity))
	return "xb-" + hex.EncodeToString(sum[:20])
}
