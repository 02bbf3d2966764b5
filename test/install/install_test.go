// Package install tests `make install`, `make uninstall`, `make deb` and the
// man page. Everything is installed into scratch DESTDIRs, never into /.
package install

import (
	"bytes"
	"compress/gzip"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"xenblkd/internal/testenv"
)

// repoRoot is the checkout this test belongs to.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "Makefile")); err != nil {
		t.Fatal(err)
	}
	return root
}

// unitFile is dist/xenblkd.service, or a stand-in while it does not exist,
// so the install layout is tested either way.
func unitFile(t *testing.T, root string) string {
	t.Helper()
	unit := filepath.Join(root, "dist/xenblkd.service")
	if _, err := os.Stat(unit); err == nil {
		return unit
	}
	t.Log("dist/xenblkd.service does not exist yet: installing a stand-in unit")
	unit = filepath.Join(t.TempDir(), "xenblkd.service")
	stub := "[Service]\nType=notify\nExecStart=/usr/sbin/xenblkd daemon\nFileDescriptorStoreMax=4096\n"
	if err := os.WriteFile(unit, []byte(stub), 0o644); err != nil {
		t.Fatal(err)
	}
	return unit
}

// runMake runs make in the checkout with the build outputs in scratch: bin/
// and build/ of the checkout are left alone.
func runMake(t *testing.T, scratch string, args ...string) (string, error) {
	t.Helper()
	root := repoRoot(t)
	args = append([]string{"-C", root, "--no-print-directory",
		"BIN=" + filepath.Join(scratch, "bin/xenblkd"),
		"ENTRY=" + filepath.Join(scratch, "bin/xenblkd-hotplug"),
		"BUILDDIR=" + filepath.Join(scratch, "build"),
		"UNIT=" + unitFile(t, root),
	}, args...)
	cmd := exec.Command("make", args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// tree lists every path under dir (relative, "/" for directories, "@target"
// for symlinks) with its mode.
func tree(t *testing.T, dir string) map[string]fs.FileMode {
	t.Helper()
	got := map[string]fs.FileMode{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		info, err := os.Lstat(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		switch {
		case info.IsDir():
			return nil
		case info.Mode()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			rel += "@" + target
		}
		got[rel] = info.Mode()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func keys(m map[string]fs.FileMode) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func gunzip(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func checkLayout(t *testing.T, destdir, sbindir string) {
	t.Helper()
	root := repoRoot(t)
	bin := strings.TrimPrefix(sbindir, "/") + "/xenblkd"
	want := map[string]fs.FileMode{
		bin:                                      0o755,
		"etc/xen/scripts/xenblkd":                0o755,
		"usr/lib/systemd/system/xenblkd.service": 0o644,
		"usr/lib/systemd/system/xenblkd.socket":  0o644,
		strings.TrimPrefix(filepath.Dir(sbindir), "/") + "/share/man/man8/xenblkd.8.gz": 0o644,
	}
	got := tree(t, destdir)
	if strings.Join(keys(got), "\n") != strings.Join(keys(want), "\n") {
		t.Fatalf("installed files:\n%s\nwant:\n%s", strings.Join(keys(got), "\n"), strings.Join(keys(want), "\n"))
	}
	for p, mode := range want {
		if got[p] != mode {
			t.Errorf("%s: mode %v, want %v", p, got[p], mode)
		}
	}

	// The binary runs, and the link finds it once DESTDIR is the root.
	out, err := exec.Command(filepath.Join(destdir, bin), "version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "xenblkd ") {
		t.Errorf("%s version: %q, %v", bin, out, err)
	}
	// The hotplug entry is the C program; it hands what it does not do itself
	// (here: an action other than add or remove) to the binary built in, or
	// to $XENBLKD_BIN.
	entry := filepath.Join(destdir, "etc/xen/scripts/xenblkd")
	if b, err := os.ReadFile(entry); err != nil || !bytes.Contains(b, []byte(sbindir+"/xenblkd\x00")) {
		t.Errorf("%s does not hand over to %s/xenblkd (err %v)", entry, sbindir, err)
	}
	cmd := exec.Command(entry, "version")
	cmd.Env = []string{"XENBLKD_BIN=" + filepath.Join(destdir, bin)}
	if out, err := cmd.CombinedOutput(); err != nil || !strings.HasPrefix(string(out), "xenblkd ") {
		t.Errorf("XENBLKD_BIN=%s %s version: %q, %v; want the binary's version", filepath.Join(destdir, bin), entry, out, err)
	}
	unit, err := os.ReadFile(filepath.Join(destdir, "usr/lib/systemd/system/xenblkd.service"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unit), sbindir+"/xenblkd") {
		t.Errorf("installed unit does not run %s/xenblkd:\n%s", sbindir, unit)
	}
	src, err := os.ReadFile(filepath.Join(root, "docs/xenblkd.8"))
	if err != nil {
		t.Fatal(err)
	}
	man := filepath.Join(destdir, strings.TrimPrefix(filepath.Dir(sbindir), "/"), "share/man/man8/xenblkd.8.gz")
	if !bytes.Equal(gunzip(t, man), src) {
		t.Errorf("%s is not docs/xenblkd.8", man)
	}
}

func TestInstallUninstall(t *testing.T) {
	scratch := t.TempDir()
	destdir := filepath.Join(scratch, "root")
	if out, err := runMake(t, scratch, "install", "DESTDIR="+destdir); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	checkLayout(t, destdir, "/usr/sbin")

	// A second install over the first is fine (upgrades do that).
	if out, err := runMake(t, scratch, "install", "DESTDIR="+destdir); err != nil {
		t.Fatalf("make install again: %v\n%s", err, out)
	}
	checkLayout(t, destdir, "/usr/sbin")

	if out, err := runMake(t, scratch, "uninstall", "DESTDIR="+destdir); err != nil {
		t.Fatalf("make uninstall: %v\n%s", err, out)
	}
	if left, _ := os.ReadDir(destdir); len(left) != 0 {
		t.Errorf("make uninstall left %v in DESTDIR", tree(t, destdir))
	}
}

func TestInstallPrefix(t *testing.T) {
	scratch := t.TempDir()
	destdir := filepath.Join(scratch, "root")
	if out, err := runMake(t, scratch, "install", "DESTDIR="+destdir, "PREFIX=/usr/local"); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	checkLayout(t, destdir, "/usr/local/sbin")
	if out, err := runMake(t, scratch, "uninstall", "DESTDIR="+destdir, "PREFIX=/usr/local"); err != nil {
		t.Fatalf("make uninstall: %v\n%s", err, out)
	}
	if left, _ := os.ReadDir(destdir); len(left) != 0 {
		t.Errorf("make uninstall left %v in DESTDIR", tree(t, destdir))
	}
}

// A file of ours left in a directory install made must not go with uninstall,
// and neither must the directory.
func TestUninstallKeepsOtherFiles(t *testing.T) {
	scratch := t.TempDir()
	destdir := filepath.Join(scratch, "root")
	if out, err := runMake(t, scratch, "install", "DESTDIR="+destdir); err != nil {
		t.Fatalf("make install: %v\n%s", err, out)
	}
	block := filepath.Join(destdir, "etc/xen/scripts/block")
	if err := os.WriteFile(block, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := runMake(t, scratch, "uninstall", "DESTDIR="+destdir); err != nil {
		t.Fatalf("make uninstall: %v\n%s", err, out)
	}
	got := keys(tree(t, destdir))
	if len(got) != 1 || got[0] != "etc/xen/scripts/block" {
		t.Errorf("after uninstall: %q, want only etc/xen/scripts/block", got)
	}
}

func TestInstallWithoutUnitFails(t *testing.T) {
	scratch := t.TempDir()
	destdir := filepath.Join(scratch, "root")
	out, err := runMake(t, scratch, "install", "DESTDIR="+destdir, "UNIT="+filepath.Join(scratch, "missing.service"))
	if err == nil {
		t.Fatalf("make install without the unit succeeded:\n%s", out)
	}
	if !strings.Contains(out, "missing.service does not exist yet") {
		t.Errorf("make install without the unit says:\n%s\nwant it to name the missing unit", out)
	}
	if _, err := os.Stat(destdir); err == nil {
		t.Errorf("make install without the unit installed %v", tree(t, destdir))
	}
}

func dpkgDeb(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("dpkg-deb", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("dpkg-deb %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestDeb(t *testing.T) {
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		testenv.Skip(t, "no dpkg-deb (dpkg)")
	}
	scratch := t.TempDir()
	out, err := runMake(t, scratch, "deb")
	if err != nil {
		t.Fatalf("make deb: %v\n%s", err, out)
	}
	if strings.Contains(strings.ToLower(out), "warning") {
		t.Errorf("make deb warned:\n%s", out)
	}
	debs, _ := filepath.Glob(filepath.Join(scratch, "build/xenblkd_*_amd64.deb"))
	if len(debs) != 1 {
		t.Fatalf("make deb built %q, want one xenblkd_*_amd64.deb\n%s", debs, out)
	}
	deb := debs[0]

	fields := map[string]string{}
	for _, f := range []string{"Package", "Version", "Architecture", "Maintainer", "Depends", "Installed-Size", "Description"} {
		fields[f] = strings.TrimSpace(dpkgDeb(t, "-f", deb, f))
		if fields[f] == "" {
			t.Errorf("control field %s is empty", f)
		}
	}
	if fields["Package"] != "xenblkd" || fields["Architecture"] != "amd64" {
		t.Errorf("Package=%q Architecture=%q, want xenblkd amd64", fields["Package"], fields["Architecture"])
	}
	if !regexp.MustCompile(`^[0-9][A-Za-z0-9.+~]*$`).MatchString(fields["Version"]) {
		t.Errorf("Version %q is not a valid Debian version without revision", fields["Version"])
	}
	if !strings.HasSuffix(deb, "_"+fields["Version"]+"_amd64.deb") {
		t.Errorf("file name %s does not carry Version %s", deb, fields["Version"])
	}
	for _, dep := range []string{"xen-utils-common", "systemd"} {
		if !strings.Contains(fields["Depends"], dep) {
			t.Errorf("Depends %q lacks %s", fields["Depends"], dep)
		}
	}

	// Contents: owned by root, the same layout as make install.
	listing := dpkgDeb(t, "-c", deb)
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^-rwxr-xr-x root/root .* \./usr/sbin/xenblkd$`),
		regexp.MustCompile(`(?m)^-rwxr-xr-x root/root .* \./etc/xen/scripts/xenblkd$`),
		regexp.MustCompile(`(?m)^-rw-r--r-- root/root .* \./usr/lib/systemd/system/xenblkd\.service$`),
		regexp.MustCompile(`(?m)^-rw-r--r-- root/root .* \./usr/lib/systemd/system/xenblkd\.socket$`),
		regexp.MustCompile(`(?m)^-rw-r--r-- root/root .* \./usr/share/man/man8/xenblkd\.8\.gz$`),
	} {
		if !want.MatchString(listing) {
			t.Errorf("dpkg-deb -c lacks %s:\n%s", want, listing)
		}
	}
	for _, line := range strings.Split(strings.TrimSpace(listing), "\n") {
		if !strings.Contains(line, " root/root ") {
			t.Errorf("not owned by root: %s", line)
		}
	}

	info := dpkgDeb(t, "--info", deb)
	for _, script := range []string{"postinst", "prerm", "postrm"} {
		if !regexp.MustCompile(`(?m)^\s+\d+ bytes,\s+\d+ lines\s+\*\s+` + script + `\s+#!/bin/sh$`).MatchString(info) {
			t.Errorf("dpkg-deb --info: %s missing or not executable:\n%s", script, info)
		}
	}

	// The maintainer scripts in the package parse as POSIX sh.
	control := filepath.Join(scratch, "control")
	dpkgDeb(t, "-e", deb, control)
	for _, script := range []string{"postinst", "prerm", "postrm"} {
		if out, err := exec.Command("sh", "-n", filepath.Join(control, script)).CombinedOutput(); err != nil {
			t.Errorf("sh -n %s: %v\n%s", script, err, out)
		}
	}

	// Extracted, the package is what make install makes, plus the docs
	// Debian requires and the lintian override.
	extracted := filepath.Join(scratch, "extracted")
	dpkgDeb(t, "-x", deb, extracted)
	for _, doc := range []string{"usr/share/doc/xenblkd/copyright", "usr/share/doc/xenblkd/changelog.gz", "usr/share/lintian/overrides/xenblkd"} {
		if _, err := os.Stat(filepath.Join(extracted, doc)); err != nil {
			t.Errorf("package lacks %s: %v", doc, err)
		}
	}
	for _, doc := range []string{"usr/share/doc", "usr/share/lintian"} {
		if err := os.RemoveAll(filepath.Join(extracted, doc)); err != nil {
			t.Fatal(err)
		}
	}
	checkLayout(t, extracted, "/usr/sbin")

	// md5sums lists every file, with the right sums.
	cmd := exec.Command("md5sum", "--check", "--strict", filepath.Join(control, "md5sums"))
	cmd.Dir = filepath.Join(scratch, "extracted-all")
	dpkgDeb(t, "-x", deb, cmd.Dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("md5sum --check DEBIAN/md5sums: %v\n%s", err, out)
	}
	sums, _ := os.ReadFile(filepath.Join(control, "md5sums"))
	for _, f := range []string{"usr/sbin/xenblkd", "usr/lib/systemd/system/xenblkd.service", "usr/share/doc/xenblkd/copyright"} {
		if !strings.Contains(string(sums), "  "+f+"\n") {
			t.Errorf("md5sums lacks %s:\n%s", f, sums)
		}
	}

	// The changelog's top entry is this version.
	gz, err := os.Open(filepath.Join(cmd.Dir, "usr/share/doc/xenblkd/changelog.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer gz.Close()
	zr, err := gzip.NewReader(gz)
	if err != nil {
		t.Fatal(err)
	}
	changelog, _ := io.ReadAll(zr)
	if want := "xenblkd (" + fields["Version"] + ") unstable; urgency="; !strings.HasPrefix(string(changelog), want) {
		t.Errorf("changelog starts %q, want %q", strings.SplitN(string(changelog), "\n", 2)[0], want)
	}
}

// TestLintian runs Debian's lintian on the package: no error and no warning
// (overrides in dist/debian/lintian-overrides carry their reasons).
func TestLintian(t *testing.T) {
	if _, err := exec.LookPath("lintian"); err != nil {
		testenv.Skip(t, "no lintian (scripts/setup.sh installs it)")
	}
	scratch := t.TempDir()
	if out, err := runMake(t, scratch, "deb"); err != nil {
		t.Fatalf("make deb: %v\n%s", err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(scratch, "build/xenblkd_*_amd64.deb"))
	if len(debs) != 1 {
		t.Fatalf("make deb built %q", debs)
	}
	out, err := exec.Command("lintian", "--info", debs[0]).CombinedOutput()
	t.Logf("lintian %s:\n%s", filepath.Base(debs[0]), out)
	if bad := regexp.MustCompile(`(?m)^[EW]: .*`).FindAllString(string(out), -1); len(bad) > 0 || err != nil {
		t.Errorf("lintian: %v\n%s", err, strings.Join(bad, "\n"))
	}
}

// TestVersionGoesUp: a build's default version is the VERSION file's release
// plus, past it, the commit count and hash, and dpkg sorts such versions by
// commit count, all above the release: an upgrade never looks like a
// downgrade.
func TestVersionGoesUp(t *testing.T) {
	if _, err := exec.LookPath("dpkg"); err != nil {
		testenv.Skip(t, "no dpkg")
	}
	root := repoRoot(t)
	out, err := exec.Command("make", "-C", root, "--no-print-directory", "-s", "deb-version").Output()
	if err != nil {
		t.Fatalf("make deb-version: %v", err)
	}
	got := strings.TrimSpace(string(out))
	base, err := os.ReadFile(filepath.Join(root, "VERSION"))
	if err != nil {
		t.Fatal(err)
	}
	release := strings.TrimSpace(string(base))
	if !regexp.MustCompile(`^` + regexp.QuoteMeta(release) + `(\+[0-9]+\.g[0-9a-f]+)?(~dirty)?$`).MatchString(got) {
		t.Errorf("version %q is not %s[+N.gHASH][~dirty]", got, release)
	}
	for _, c := range []struct{ older, newer string }{
		{release, release + "+1.gfffffff"},
		{release + "+9.gfffffff", release + "+10.g0000000"},
		{release + "+10.g0000000~dirty", release + "+10.g0000000"},
		{release + "+99.gabcdef0", "99.0.0"},
	} {
		if err := exec.Command("dpkg", "--compare-versions", c.older, "lt", c.newer).Run(); err != nil {
			t.Errorf("dpkg does not sort %s below %s", c.older, c.newer)
		}
	}
	if !strings.HasSuffix(got, "~dirty") {
		if err := exec.Command("dpkg", "--compare-versions", got, "ge", release).Run(); err != nil {
			t.Errorf("this build's version %s sorts below the release %s", got, release)
		}
	}
}
