// Package takeover makes xenblkd serve as Xen's /etc/xen/scripts/block, the
// script libxl runs for every disk that names no other, and undoes it. The
// Debian way to replace another package's file is a diversion: dpkg-divert
// renames xen-utils-common's block to block.xenblkd-orig and records that
// the package xenblkd owns the name, so upgrades of xen-utils-common install
// their block under the diverted name and never overwrite ours. block then
// becomes a symbolic link to the hotplug entry /etc/xen/scripts/xenblkd
// resolves to. The other scripts (block-iscsi, block-drbd, ...) are not
// touched.
//
// Every step checks the state first and refuses, with what to do, when it
// cannot be undone safely; both directions are idempotent.
package takeover

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"syscall"
)

// Names, as dpkg sees them (inside Root).
const (
	Package   = "xenblkd"
	ScriptDir = "/etc/xen/scripts"
	Block     = ScriptDir + "/block"
	Diverted  = ScriptDir + "/block.xenblkd-orig"
	Entry     = ScriptDir + "/xenblkd"
)

// Config says where to act. The zero value acts on this host.
type Config struct {
	// Root is the file system root dpkg-divert and every path are relative to
	// (dpkg-divert --root); "" is /.
	Root string
	// DpkgDivert is the dpkg-divert command ("dpkg-divert" if empty).
	DpkgDivert string
}

// State is what Status found.
type State struct {
	// DivertedBy is the package holding a diversion of Block ("" if none;
	// "LOCAL" for an administrator's own).
	DivertedBy string
	// DivertedTo is where the diversion moved Block.
	DivertedTo string
	// Link is true when Block is a symbolic link to the same file as Entry.
	Link bool
	// EntryTarget is the file Entry resolves to ("" if Entry is missing).
	EntryTarget string
}

// TakenOver reports whether xenblkd serves as block.
func (s State) TakenOver() bool { return s.DivertedBy == Package && s.Link }

func (c Config) path(p string) string { return filepath.Join(c.Root, p) }

func (c Config) dpkgDivert(args ...string) (string, error) {
	cmd := c.DpkgDivert
	if cmd == "" {
		cmd = "dpkg-divert"
	}
	if c.Root != "" {
		args = append([]string{"--root", c.Root}, args...)
	}
	var stdout, stderr bytes.Buffer
	x := exec.Command(cmd, args...)
	x.Stdout, x.Stderr = &stdout, &stderr
	if err := x.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if errors.Is(err, exec.ErrNotFound) {
			msg = "dpkg-divert not found: takeover needs dpkg (Debian or a derivative)"
		}
		return "", fmt.Errorf("%s %s: %v: %s", cmd, strings.Join(args, " "), err, msg)
	}
	return strings.TrimSpace(stdout.String()), nil
}

// resolve follows the symbolic links of p's last component inside Root and
// returns the path (inside Root) of the file it names. Directories on the
// way are taken as they are.
func (c Config) resolve(p string) (string, error) {
	for range 40 { // ELOOP, as the kernel counts
		fi, err := os.Lstat(c.path(p))
		if err != nil {
			return "", err
		}
		if fi.Mode()&os.ModeSymlink == 0 {
			return p, nil
		}
		t, err := os.Readlink(c.path(p))
		if err != nil {
			return "", err
		}
		if !path.IsAbs(t) {
			t = path.Join(path.Dir(p), t)
		}
		p = path.Clean(t)
	}
	return "", fmt.Errorf("%s: %w", p, syscall.ELOOP)
}

// sameFile reports whether a and b (inside Root) are one file.
func (c Config) sameFile(a, b string) bool {
	ra, err1 := c.resolve(a)
	rb, err2 := c.resolve(b)
	if err1 != nil || err2 != nil {
		return false
	}
	fa, err1 := os.Stat(c.path(ra))
	fb, err2 := os.Stat(c.path(rb))
	return err1 == nil && err2 == nil && os.SameFile(fa, fb)
}

// Status reads the diversion and the files.
func (c Config) Status() (State, error) {
	var s State
	by, err := c.dpkgDivert("--listpackage", Block)
	if err != nil {
		return s, err
	}
	s.DivertedBy = by
	if by != "" {
		if s.DivertedTo, err = c.dpkgDivert("--truename", Block); err != nil {
			return s, err
		}
	}
	if t, err := c.resolve(Entry); err == nil {
		if fi, err := os.Stat(c.path(t)); err == nil && fi.Mode().IsRegular() {
			s.EntryTarget = t
		}
	}
	if fi, err := os.Lstat(c.path(Block)); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		s.Link = s.EntryTarget != "" && c.sameFile(Block, Entry)
	}
	return s, nil
}

// Take makes xenblkd serve as block. It reports whether anything changed
// (false: it was taken over already).
func (c Config) Take() (changed bool, err error) {
	s, err := c.Status()
	if err != nil {
		return false, err
	}
	if s.EntryTarget == "" {
		return false, fmt.Errorf("%s is missing or names no file: install xenblkd first (the package, or make install)", Entry)
	}
	if fi, err := os.Stat(c.path(s.EntryTarget)); err != nil || fi.Mode().Perm()&0o111 == 0 {
		return false, fmt.Errorf("%s (via %s) is not executable", s.EntryTarget, Entry)
	}
	switch s.DivertedBy {
	case Package:
		if s.Link {
			return false, nil
		}
		// Diverted but the link is missing (interrupted earlier): repair it,
		// never replace something else.
		if _, err := os.Lstat(c.path(Block)); err == nil {
			return false, fmt.Errorf("%s is diverted by xenblkd but is not a link to %s: "+
				"something replaced it; move it away and run xenblkd takeover again", Block, Entry)
		}
		return true, c.link(s.EntryTarget)
	case "":
	default:
		return false, fmt.Errorf("%s is already diverted (to %s) by %s: xenblkd will not stack a second diversion; "+
			"remove that one first (dpkg-divert --remove %s)", Block, s.DivertedTo, s.DivertedBy, Block)
	}
	fi, err := os.Lstat(c.path(Block))
	switch {
	case errors.Is(err, os.ErrNotExist):
		return false, fmt.Errorf("%s does not exist: nothing to take over (is xen-utils-common installed?); "+
			"use script=xenblkd in the disk specifications instead", Block)
	case err != nil:
		return false, err
	case fi.Mode()&os.ModeSymlink != 0 && c.sameFile(Block, Entry):
		return false, fmt.Errorf("%s is already a link to xenblkd but not diverted: it was made by hand; "+
			"remove it, restore the stock script (apt-get install --reinstall xen-utils-common), then run xenblkd takeover", Block)
	}
	if _, err := os.Lstat(c.path(Diverted)); err == nil {
		return false, fmt.Errorf("%s already exists: it would be overwritten; move it away first", Diverted)
	}
	if _, err := c.dpkgDivert("--package", Package, "--divert", Diverted, "--rename", "--add", Block); err != nil {
		return false, err
	}
	if err := c.link(s.EntryTarget); err != nil {
		if _, uerr := c.dpkgDivert("--package", Package, "--rename", "--remove", Block); uerr != nil {
			err = errors.Join(err, fmt.Errorf("and could not undo the diversion: %w", uerr))
		}
		return false, err
	}
	return true, nil
}

// link makes Block a symbolic link to target, atomically.
func (c Config) link(target string) error {
	tmp := c.path(Block + ".xenblkd-new")
	os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("link %s to %s: %w", Block, target, err)
	}
	if err := os.Rename(tmp, c.path(Block)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("link %s to %s: %w", Block, target, err)
	}
	return nil
}

// Undo restores the stock block. It reports whether anything changed (false:
// it was not taken over).
func (c Config) Undo() (changed bool, err error) {
	s, err := c.Status()
	if err != nil {
		return false, err
	}
	switch s.DivertedBy {
	case Package:
	case "":
		return false, nil
	default:
		return false, fmt.Errorf("%s is diverted by %s, not by xenblkd: not ours to undo", Block, s.DivertedBy)
	}
	if _, err := os.Lstat(c.path(Diverted)); err != nil {
		return false, fmt.Errorf("the stock script %s is missing, so undoing would leave no block script: "+
			"restore it (apt-get install --reinstall xen-utils-common installs it there), then run xenblkd takeover --undo again", Diverted)
	}
	fi, err := os.Lstat(c.path(Block))
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return false, err
	case fi.Mode()&os.ModeSymlink == 0 || !c.ourLink():
		return false, fmt.Errorf("%s is not xenblkd's link (something replaced it): "+
			"move it away, then run xenblkd takeover --undo again", Block)
	default:
		if err := os.Remove(c.path(Block)); err != nil {
			return false, err
		}
	}
	if _, err := c.dpkgDivert("--package", Package, "--rename", "--remove", Block); err != nil {
		if s.EntryTarget != "" {
			if lerr := c.link(s.EntryTarget); lerr != nil {
				err = errors.Join(err, lerr)
			}
		}
		return false, err
	}
	return true, nil
}

// ourLink: Block is a link to the entry's file, or a dangling link whose
// target is named xenblkd (the package's files are being removed).
func (c Config) ourLink() bool {
	if c.sameFile(Block, Entry) {
		return true
	}
	t, err := os.Readlink(c.path(Block))
	if err != nil || path.Base(t) != "xenblkd" {
		return false
	}
	_, err = os.Stat(c.path(Block))
	return errors.Is(err, os.ErrNotExist)
}
