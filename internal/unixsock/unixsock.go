// Package unixsock creates the daemon's listening unix sockets (the API and
// the metrics endpoint) in directories only root can change.
package unixsock

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// ErrUnsafeDir: a socket's directory (or one above it) can be written by a
// user other than root (or the daemon's own uid), who could then replace the
// socket and answer in the daemon's place.
var ErrUnsafeDir = errors.New("unsafe socket directory")

// ErrInUse: something answers on the socket's path already.
var ErrInUse = errors.New("something already listens there")

// Listen creates a unix stream socket at path: its directory 0700 if
// missing, refused if non-root users can write it (ErrUnsafeDir); a stale
// socket (nobody answers) is replaced, a live one is ErrInUse. mode, if not
// 0, is applied to the socket (else the umask decides).
func Listen(path string, mode os.FileMode) (*net.UnixListener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create socket directory: %w", err)
	}
	if err := CheckDir(dir); err != nil {
		return nil, err
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("listen on %s: %w", path, ErrInUse)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		os.Remove(path) // stale: nobody answered
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	if mode != 0 {
		if err := os.Chmod(path, mode); err != nil {
			l.Close()
			return nil, fmt.Errorf("listen on %s: %w", path, err)
		}
	}
	return l, nil
}

// CheckDir checks dir and every directory above it: each must be owned by
// root or the daemon's uid and not writable by group or others, except that
// a sticky directory (/tmp) only protects its entries, which is enough when
// the next step down is safe.
func CheckDir(dir string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	self := uint32(os.Getuid())
	for d := dir; ; d = filepath.Dir(d) {
		var st unix.Stat_t
		if err := unix.Stat(d, &st); err != nil {
			return fmt.Errorf("check socket directory %s: %w", d, err)
		}
		mode := os.FileMode(st.Mode & 0o7777)
		switch {
		case st.Uid != 0 && st.Uid != self:
			return fmt.Errorf("%w: %s is owned by uid %d, not root: chown root %s (or choose a root-owned --socket directory)", ErrUnsafeDir, d, st.Uid, d)
		case st.Mode&0o022 != 0 && (d == dir || st.Mode&unix.S_ISVTX == 0):
			return fmt.Errorf("%w: %s is writable by non-root users (mode %04o): chmod go-w %s (or choose a root-only --socket directory such as /run/xenblkd)", ErrUnsafeDir, d, mode, d)
		}
		if d == "/" {
			return nil
		}
	}
}
