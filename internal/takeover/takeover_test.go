package takeover_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"xenblkd/internal/takeover"
	"xenblkd/internal/testenv"
)

// scratch makes a root with dpkg's admin directory, a stock block script,
// another script of xen-utils-common and the xenblkd entry (a link to the
// binary, as make install and the package lay it out).
func scratch(t *testing.T) takeover.Config {
	t.Helper()
	if _, err := exec.LookPath("dpkg-divert"); err != nil {
		testenv.Skip(t, "no dpkg-divert (dpkg)")
	}
	root := t.TempDir()
	for _, d := range []string{"var/lib/dpkg", "etc/xen/scripts", "usr/sbin"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write(t, root, "etc/xen/scripts/block", "#!/bin/bash\n# stock\n", 0o755)
	write(t, root, "etc/xen/scripts/block-iscsi", "#!/bin/bash\n# iscsi\n", 0o755)
	write(t, root, "usr/sbin/xenblkd", "#!/bin/sh\n# xenblkd\n", 0o755)
	if err := os.Symlink("/usr/sbin/xenblkd", filepath.Join(root, "etc/xen/scripts/xenblkd")); err != nil {
		t.Fatal(err)
	}
	return takeover.Config{Root: root}
}

func write(t *testing.T, root, p, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(root, p), []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, root, p string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, p))
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	return string(b)
}

func TestTakeAndUndo(t *testing.T) {
	c := scratch(t)
	for i := range 2 { // the second time: nothing to do
		changed, err := c.Take()
		if err != nil || changed != (i == 0) {
			t.Fatalf("Take #%d: changed %v, err %v; want changed %v, no error", i+1, changed, err, i == 0)
		}
		s, err := c.Status()
		if err != nil || !s.TakenOver() || s.DivertedTo != takeover.Diverted || s.EntryTarget != "/usr/sbin/xenblkd" {
			t.Fatalf("after Take: %+v, %v", s, err)
		}
		if got, _ := os.Readlink(filepath.Join(c.Root, takeover.Block)); got != "/usr/sbin/xenblkd" {
			t.Fatalf("block links to %q, want /usr/sbin/xenblkd (what the entry resolves to)", got)
		}
		if got := read(t, c.Root, takeover.Diverted); !strings.Contains(got, "# stock") {
			t.Fatalf("diverted script: %q", got)
		}
		if got := read(t, c.Root, "etc/xen/scripts/block-iscsi"); !strings.Contains(got, "# iscsi") {
			t.Fatalf("block-iscsi changed: %q", got)
		}
	}
	for i := range 2 {
		changed, err := c.Undo()
		if err != nil || changed != (i == 0) {
			t.Fatalf("Undo #%d: changed %v, err %v", i+1, changed, err)
		}
		s, err := c.Status()
		if err != nil || s.DivertedBy != "" || s.Link {
			t.Fatalf("after Undo: %+v, %v", s, err)
		}
		fi, err := os.Lstat(filepath.Join(c.Root, takeover.Block))
		if err != nil || !fi.Mode().IsRegular() || !strings.Contains(read(t, c.Root, takeover.Block), "# stock") {
			t.Fatalf("block after Undo is not the stock script: %v %v", fi, err)
		}
		if _, err := os.Lstat(filepath.Join(c.Root, takeover.Diverted)); !os.IsNotExist(err) {
			t.Fatalf("%s left after Undo: %v", takeover.Diverted, err)
		}
	}
}

// TestRefusals: each case leaves the host as it found it and says what to do.
func TestRefusals(t *testing.T) {
	cases := []struct {
		name    string
		prepare func(t *testing.T, c takeover.Config)
		undo    bool // the refusal is Undo's (after a successful Take)
		want    string
	}{
		{"no entry", func(t *testing.T, c takeover.Config) {
			os.Remove(filepath.Join(c.Root, takeover.Entry))
		}, false, "install xenblkd first"},
		{"no stock block", func(t *testing.T, c takeover.Config) {
			os.Remove(filepath.Join(c.Root, takeover.Block))
		}, false, "nothing to take over"},
		{"diverted by another package", func(t *testing.T, c takeover.Config) {
			run(t, "dpkg-divert", "--root", c.Root, "--package", "other", "--divert", "/etc/xen/scripts/block.other", "--rename", "--add", takeover.Block)
		}, false, "by other"},
		{"diverted name taken", func(t *testing.T, c takeover.Config) {
			write(t, c.Root, takeover.Diverted, "x", 0o644)
		}, false, "already exists"},
		{"hand-made link", func(t *testing.T, c takeover.Config) {
			os.Remove(filepath.Join(c.Root, takeover.Block))
			os.Symlink("/usr/sbin/xenblkd", filepath.Join(c.Root, takeover.Block))
		}, false, "made by hand"},
		{"block replaced after takeover", func(t *testing.T, c takeover.Config) {
			os.Remove(filepath.Join(c.Root, takeover.Block))
			write(t, c.Root, takeover.Block, "mine", 0o755)
		}, true, "something replaced it"},
		{"diverted stock script lost", func(t *testing.T, c takeover.Config) {
			os.Remove(filepath.Join(c.Root, takeover.Diverted))
		}, true, "would leave no block script"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := scratch(t)
			if tc.undo {
				if _, err := c.Take(); err != nil {
					t.Fatal(err)
				}
			}
			tc.prepare(t, c)
			before := snapshot(t, c.Root)
			var err error
			if tc.undo {
				_, err = c.Undo()
			} else {
				_, err = c.Take()
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
			if after := snapshot(t, c.Root); after != before {
				t.Fatalf("refusal changed the root:\nbefore %s\nafter  %s", before, after)
			}
		})
	}
}

// TestUndoDanglingLink: the package's files are gone (removal), the link
// dangles: Undo still restores the stock script.
func TestUndoDanglingLink(t *testing.T) {
	c := scratch(t)
	if _, err := c.Take(); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(c.Root, "usr/sbin/xenblkd"))
	os.Remove(filepath.Join(c.Root, takeover.Entry))
	if changed, err := c.Undo(); err != nil || !changed {
		t.Fatalf("Undo with a dangling link: %v %v", changed, err)
	}
	if !strings.Contains(read(t, c.Root, takeover.Block), "# stock") {
		t.Fatal("stock script not restored")
	}
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v: %s", name, args, err, out)
	}
}

// snapshot lists the scripts directory and dpkg's diversions.
func snapshot(t *testing.T, root string) string {
	t.Helper()
	var b strings.Builder
	entries, _ := os.ReadDir(filepath.Join(root, takeover.ScriptDir))
	for _, e := range entries {
		p := filepath.Join(root, takeover.ScriptDir, e.Name())
		l, _ := os.Readlink(p)
		c, _ := os.ReadFile(p)
		b.WriteString(e.Name() + "->" + l + ":" + string(c) + ";")
	}
	d, _ := os.ReadFile(filepath.Join(root, "var/lib/dpkg/diversions"))
	b.WriteString(strings.ReplaceAll(string(d), "\n", "|"))
	return b.String()
}
