package install

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"xenblkd/internal/testenv"
	"xenblkd/test/build"
)

// takeoverRoot is a scratch system for the maintainer scripts: dpkg's admin
// directory, a stock block script, block-iscsi, block-tap (Xen 4.19+'s
// script for backendtype=tap, backend/vbd3: not xenblkd's), and xenblkd (the real
// binary) installed as the package lays it out. The scripts find it through
// DPKG_ROOT, which dpkg exports to maintainer scripts and dpkg-divert and
// xenblkd takeover honour.
func takeoverRoot(t *testing.T) (root, bin string) {
	t.Helper()
	if _, err := exec.LookPath("dpkg-divert"); err != nil {
		testenv.Skip(t, "no dpkg-divert (dpkg)")
	}
	root = t.TempDir()
	for _, d := range []string{"var/lib/dpkg", "etc/xen/scripts", "usr/sbin"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(root, "etc/xen/scripts/block"), []byte("#!/bin/bash\n# stock\n"), 0o755)
	os.WriteFile(filepath.Join(root, "etc/xen/scripts/block-iscsi"), []byte("#!/bin/bash\n# iscsi\n"), 0o755)
	os.WriteFile(filepath.Join(root, "etc/xen/scripts/block-tap"), []byte("#!/bin/bash\n# tap\n"), 0o755)
	bin, err := build.Xenblkd(filepath.Join(root, "usr/sbin"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/usr/sbin/xenblkd", filepath.Join(root, "etc/xen/scripts/xenblkd")); err != nil {
		t.Fatal(err)
	}
	return root, bin
}

// maint runs a maintainer script against root, with the systemd helpers
// stubbed and the root's /usr/sbin on PATH (where the package's xenblkd is).
func maint(t *testing.T, root, script string, args ...string) (string, error) {
	t.Helper()
	log := filepath.Join(t.TempDir(), "calls")
	cmd := exec.Command(filepath.Join(repoRoot(t), "dist/debian", script), args...)
	cmd.Env = []string{"PATH=" + stubPath(t, log) + ":" + filepath.Join(root, "usr/sbin") + ":/usr/sbin:/usr/bin:/sbin:/bin",
		"DPKG_ROOT=" + root, "XENBLKD_SOCKET=" + filepath.Join(root, "no-daemon.sock"),
		"XENBLKD_REAL=" + filepath.Join(root, "usr/sbin/xenblkd")}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func takeoverCmd(t *testing.T, root, bin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"takeover"}, args...)...)
	cmd.Env = []string{"DPKG_ROOT=" + root, "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("xenblkd takeover %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// blockIs reports what block is: "stock", "xenblkd" (the link) or why not.
func blockIs(t *testing.T, root string) string {
	t.Helper()
	p := filepath.Join(root, "etc/xen/scripts/block")
	if l, err := os.Readlink(p); err == nil {
		if l == "/usr/sbin/xenblkd" {
			return "xenblkd"
		}
		return "link to " + l
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return err.Error()
	}
	if strings.Contains(string(b), "# stock") {
		if _, err := os.Lstat(filepath.Join(root, "etc/xen/scripts/block.xenblkd-orig")); err == nil {
			return "stock, but block.xenblkd-orig left"
		}
		if d, _ := os.ReadFile(filepath.Join(root, "var/lib/dpkg/diversions")); strings.Contains(string(d), "xenblkd") {
			return "stock, but the diversion is left"
		}
		return "stock"
	}
	return "something else: " + string(b)
}

// TestMaintainerScriptsUndoTakeover: removing the package gives block back
// (prerm, with the binary; postrm, if the binary is gone already); an upgrade
// keeps the takeover; a block replaced by hand stops the removal.
func TestMaintainerScriptsUndoTakeover(t *testing.T) {
	root, bin := takeoverRoot(t)
	takeoverCmd(t, root, bin, "--no-adopt")
	if got := blockIs(t, root); got != "xenblkd" {
		t.Fatalf("after xenblkd takeover: block is %s", got)
	}
	for name, want := range map[string]string{"block-iscsi": "# iscsi", "block-tap": "# tap"} {
		if got, err := os.ReadFile(filepath.Join(root, "etc/xen/scripts", name)); err != nil || !strings.Contains(string(got), want) {
			t.Errorf("after xenblkd takeover: %s is %q, %v; want the original", name, got, err)
		}
	}
	if out, err := maint(t, root, "prerm", "upgrade", "1.0"); err != nil || blockIs(t, root) != "xenblkd" {
		t.Fatalf("prerm upgrade: %v %s; block is %s, want still xenblkd", err, out, blockIs(t, root))
	}
	if out, err := maint(t, root, "prerm", "remove"); err != nil || blockIs(t, root) != "stock" {
		t.Fatalf("prerm remove: %v %s; block is %s, want stock", err, out, blockIs(t, root))
	}
	if out, err := maint(t, root, "postrm", "remove"); err != nil || blockIs(t, root) != "stock" {
		t.Fatalf("postrm remove after prerm's undo: %v %s; block is %s", err, out, blockIs(t, root))
	}
	if got, _ := os.ReadFile(filepath.Join(root, "etc/xen/scripts/block-iscsi")); string(got) != "#!/bin/bash\n# iscsi\n" {
		t.Fatalf("block-iscsi changed: %q", got)
	}

	// The binary is gone before postrm (dpkg removed the files): postrm alone.
	takeoverCmd(t, root, bin, "--no-adopt")
	os.Remove(bin)
	if out, err := maint(t, root, "postrm", "remove"); err != nil || blockIs(t, root) != "stock" {
		t.Fatalf("postrm remove with the binary gone: %v %s; block is %s, want stock", err, out, blockIs(t, root))
	}
}

func TestMaintainerScriptsRefuseUnsafeUndo(t *testing.T) {
	root, bin := takeoverRoot(t)
	takeoverCmd(t, root, bin, "--no-adopt")
	p := filepath.Join(root, "etc/xen/scripts/block")
	os.Remove(p)
	os.WriteFile(p, []byte("#!/bin/sh\n# the administrator's own\n"), 0o755)
	out, err := maint(t, root, "prerm", "remove")
	if err == nil || !strings.Contains(out, "something replaced it") {
		t.Fatalf("prerm remove with block replaced by hand: %v\n%s\nwant a refusal saying why", err, out)
	}
	if b, _ := os.ReadFile(p); !strings.Contains(string(b), "administrator's own") {
		t.Fatal("the administrator's block was touched")
	}
}

// TestManPageTakeover: the man page documents the takeover command (the
// page's rendering is checked by TestManPage).
func TestManPageTakeover(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "docs/xenblkd.8"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{".B takeover", `\-\-undo`, `\-\-status`, `block.xenblkd\-orig`, `\-\-hotplug\-entry`, "DPKG_ROOT"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("docs/xenblkd.8 lacks %q", want)
		}
	}
}
