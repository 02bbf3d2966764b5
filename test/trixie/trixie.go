// Package trixie finds the cached Debian 13 ("trixie") root file system that
// scripts/trixie-root.sh builds (scripts/setup.sh runs it): Xen 4.20's
// xenstored and oxenstored, systemd 257 and lintian 2.122 beside the host's
// Debian 12 stack. Tests only read it, or run its programs in a private mount
// namespace with their own /run, /tmp and overlays: the cache is never
// written.
package trixie

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// DefaultRoot is where scripts/trixie-root.sh puts the root unless
// $XENBLKD_TRIXIE_ROOT says otherwise.
const DefaultRoot = "/var/cache/xenblkd-trixie-root"

// Root returns the root's directory, or an error saying how to build it.
func Root() (string, error) {
	root := os.Getenv("XENBLKD_TRIXIE_ROOT")
	if root == "" {
		root = DefaultRoot
	}
	if _, err := os.Stat(filepath.Join(root, ".xenblkd-complete")); err != nil {
		return "", fmt.Errorf("no Debian 13 root at %s: run scripts/setup.sh (as root; it runs scripts/trixie-root.sh, ~2 min once): %w", root, err)
	}
	return root, nil
}

// HostDir is where Command shows its dir inside the root.
const HostDir = "/tmp/host"

// Command returns a command that runs args chrooted in root, in a private
// mount namespace with the host's /proc, a tmpfs on the root's /tmp and /run
// (the cache is never written) and dir bind-mounted read-only at HostDir.
// It needs root.
func Command(root, dir string, args ...string) *exec.Cmd {
	script := `R=$1 D=$2 H=$3; shift 3
mount -t proc proc "$R/proc" && mount -t tmpfs tmpfs "$R/tmp" && mount -t tmpfs tmpfs "$R/run" &&
mkdir -p "$R$H" && mount --bind -o ro "$D" "$R$H" &&
exec chroot "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"`
	cmd := exec.Command("unshare", append([]string{"-m", "--propagation", "private", "sh", "-c", script, "sh", root, dir, HostDir}, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	return cmd
}
