package install

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"xenblkd/internal/testenv"
	"xenblkd/test/trixie"
)

// The package on Debian 13: one .deb serves Debian 12 and 13, so it is checked
// with Debian 13's lintian (2.122, which reports files under the /lib alias
// as aliased-location) and installed, upgraded and purged there, in the
// cached trixie root (scripts/trixie-root.sh).

// inTrixie is inRoot in the cached Debian 13 root.
func inTrixie(t *testing.T, dir, script string) (string, error) {
	t.Helper()
	root, err := trixie.Root()
	if err != nil {
		testenv.Skip(t, err.Error())
	}
	return inRoot(t, root, dir, script)
}

// inRoot runs script with sh inside an overlay of root (lower read-only,
// upper in a test directory; "/" is the host's root file system), chrooted,
// in a private mount namespace: root is never written, and nothing is left
// mounted when the namespace's last process exits. dir is bind-mounted
// read-only on /debs. No systemd runs there (/run is an empty tmpfs), so the
// maintainer scripts enable the units but start nothing.
func inRoot(t *testing.T, root, dir, script string) (string, error) {
	t.Helper()
	testenv.RequireRoot(t, "mounts an overlay of a root file system and chroots into it")
	scratch := t.TempDir()
	setup := `set -e
R=$1 S=$2 D=$3 SCRIPT=$4
mkdir -p "$S/upper" "$S/work" "$S/merged"
mount -t overlay overlay -o "lowerdir=$R,upperdir=$S/upper,workdir=$S/work" "$S/merged"
mount -t proc proc "$S/merged/proc"
mount -t tmpfs tmpfs "$S/merged/tmp"
mount -t tmpfs tmpfs "$S/merged/run"
mkdir -p "$S/merged/debs"
mount --bind -o ro "$D" "$S/merged/debs"
exec chroot "$S/merged" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 sh -ec "$SCRIPT"`
	cmd := exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c", setup, "sh", root, scratch, dir, script)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// buildDeb runs make deb into dir/name.deb with extra make arguments.
func buildDeb(t *testing.T, dir, name string, extra ...string) {
	t.Helper()
	scratch := t.TempDir()
	if out, err := runMake(t, scratch, append([]string{"deb"}, extra...)...); err != nil {
		t.Fatalf("make deb %v: %v\n%s", extra, err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(scratch, "build/xenblkd_*_amd64.deb"))
	if len(debs) != 1 {
		t.Fatalf("make deb built %q", debs)
	}
	if err := os.Rename(debs[0], filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

// TestLintianTrixie: Debian 13's lintian reports no error and no warning.
func TestLintianTrixie(t *testing.T) {
	dir := t.TempDir()
	buildDeb(t, dir, "xenblkd.deb")
	out, err := inTrixie(t, dir, `lintian --version; lintian --info /debs/xenblkd.deb`)
	t.Logf("Debian 13 lintian:\n%s", out)
	if bad := regexp.MustCompile(`(?m)^[EW]: .*`).FindAllString(out, -1); len(bad) > 0 || err != nil {
		t.Errorf("lintian: %v\n%s", err, strings.Join(bad, "\n"))
	}
}

// TestPackageUpgrade: on Debian 12 (an overlay of the host) and 13 (of the
// trixie root) the package installs (units enabled), upgrades from a package
// of the previous layout (units under /lib/systemd/system, which is /usr/lib's
// alias on both: the files move within the package and must survive dpkg's
// removal of the old paths), verifies, and purges without a trace.
func TestPackageUpgrade(t *testing.T) {
	if _, err := exec.LookPath("dpkg-deb"); err != nil {
		testenv.Skip(t, "no dpkg-deb")
	}
	dir := t.TempDir()
	buildDeb(t, dir, "old.deb", "VERSION=0.0.1~old", "DEB_UNITDIR=/lib/systemd/system")
	buildDeb(t, dir, "new.deb")
	for _, release := range []string{"host", "trixie"} {
		t.Run(release, func(t *testing.T) {
			var out string
			var err error
			if release == "host" {
				if fi, lerr := os.Lstat("/lib"); lerr != nil || fi.Mode()&os.ModeSymlink == 0 {
					testenv.Skip(t, "the host's /usr is not merged (/lib is no link)")
				}
				out, err = inRoot(t, "/", dir, packageUpgradeScript)
			} else {
				out, err = inTrixie(t, dir, packageUpgradeScript)
			}
			t.Logf("%s: install, upgrade, purge:\n%s", release, out)
			if err != nil || !strings.Contains(out, "== clean") {
				t.Fatalf("%v", err)
			}
			// systemd 252 names the one key it ignores (docs/fdstore.md); nothing else.
			for _, line := range strings.Split(out, "\n") {
				if strings.Contains(line, "xenblkd.service:") && !strings.Contains(line, "Unknown key 'FileDescriptorStorePreserve'") {
					t.Errorf("systemd-analyze verify complains about the unit: %s", line)
				}
			}
		})
	}
}

// packageUpgradeScript installs /debs/old.deb, upgrades to /debs/new.deb,
// checks and purges; it prints "== clean" at the end.
const packageUpgradeScript = `
echo "== install the previous layout"
dpkg -i /debs/old.deb
test -f /lib/systemd/system/xenblkd.service
test -L /etc/systemd/system/multi-user.target.wants/xenblkd.service
test -L /etc/systemd/system/sockets.target.wants/xenblkd.socket
echo "== upgrade"
dpkg -i /debs/new.deb
dpkg-query -W -f='${Status} ${Version}\n' xenblkd
dpkg-query -W -f='${Status}' xenblkd | grep -qx 'install ok installed'
dpkg -L xenblkd | grep -x /usr/lib/systemd/system/xenblkd.service
for f in /usr/lib/systemd/system/xenblkd.service /usr/lib/systemd/system/xenblkd.socket /usr/sbin/xenblkd /etc/xen/scripts/xenblkd; do
	test -f "$f" || { echo "missing after the upgrade: $f"; exit 1; }
done
dpkg --verify xenblkd
systemctl --root=/ is-enabled xenblkd.service xenblkd.socket
echo "== verify the units with systemd $(systemctl --version | head -1)"
systemd-analyze verify --man=no /usr/lib/systemd/system/xenblkd.socket /usr/lib/systemd/system/xenblkd.service
echo "== purge"
dpkg --purge xenblkd
left=$(ls -d /usr/sbin/xenblkd /usr/lib/systemd/system/xenblkd.* /etc/xen/scripts/xenblkd \
	/etc/systemd/system/*.wants/xenblkd.* /var/lib/systemd/deb-systemd-helper-enabled/*xenblkd* \
	/var/lib/systemd/deb-systemd-helper-masked/*xenblkd* 2>/dev/null || true)
test -z "$left" || { echo "left after purge: $left"; exit 1; }
echo "== clean"`
