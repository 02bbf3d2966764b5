// Package xenstored starts private instances of Debian's real XenStore daemons
// (C xenstored and OCaml oxenstored from xen-utils-X.Y) for tests, without a
// hypervisor: an LD_PRELOAD shim (testdata/xsfake.c, built here with gcc on first use)
// fakes the handful of hypervisor interfaces they open at start. The daemons
// are the host's (Debian 12: Xen 4.17), or those of another root file system
// (StartIn: the cached Debian 13 root, Xen 4.20, run chrooted); the Xen
// version is found at run time (/usr/lib/xen-X.Y), never written in.
//
// Each daemon listens on its own socket in a private directory; nothing on the
// host's /run/xenstored is used (oxenstored, whose socket path is compiled in,
// and every chrooted daemon run in a private mount namespace with the
// directory bind-mounted there).
// Limits of this peer: every socket client is dom0 (privileged, so permissions
// are stored but never refuse it), there are no guest rings, and
// @releaseDomain never fires. See ../../docs/xenstore.md.
package xenstored

import (
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"xenblkd/internal/xenstore"
)

// Kind names a xenstored implementation.
type Kind string

// The two daemons of Debian's xen-utils-X.Y.
const (
	C     Kind = "cxenstored"
	OCaml Kind = "oxenstored"
)

// innerDir is the daemon's private directory as a chrooted daemon sees it:
// oxenstored's compiled-in socket directory (/var/run is /run in the roots).
const innerDir = "/run/xenstored"

const (
	// startTimeout bounds how long a daemon may take to accept connections;
	// it only turns a broken setup into an error instead of a hang.
	startTimeout = 20 * time.Second
)

//go:embed testdata/xsfake.c
var shimSource []byte

// Daemon is a running private xenstored.
type Daemon struct {
	Kind       Kind
	Root       string // the root file system it runs in; "" for the host's
	XenVersion string // of the daemon's xen-utils, e.g. "4.17"
	Socket     string // the daemon's unix socket, as seen from the host
	Pid        int    // the daemon process itself (for oxenstored: not the unshare wrapper)
	Dir        string // private directory: socket, config, logs

	bin string // the daemon's binary, as seen from the host

	shim   shimFiles
	exited chan struct{} // closed when the current process has been reaped
}

// Start starts a private daemon; it fails tb (t.Fatal) with a clear message if
// prerequisites are missing, registers tb.Cleanup to stop it by pid, and sets
// nothing global.
func Start(tb testing.TB, kind Kind) *Daemon {
	tb.Helper()
	return StartIn(tb, kind, "")
}

// StartIn is Start with the daemon of another root file system (root "" is
// the host's), run chrooted there in a private mount namespace.
func StartIn(tb testing.TB, kind Kind, root string) *Daemon {
	tb.Helper()
	d, stop, err := StartMainIn(kind, root)
	if err != nil {
		tb.Fatalf("start %s: %v", kind, err)
	}
	tb.Cleanup(stop)
	return d
}

// StartMain is for TestMain (one daemon per test package): returns the daemon
// and a stop func that kills it and removes its directory.
func StartMain(kind Kind) (*Daemon, func(), error) { return StartMainIn(kind, "") }

// StartMainIn is StartMain with the daemon of root ("" for the host's).
func StartMainIn(kind Kind, root string) (*Daemon, func(), error) {
	if kind != C && kind != OCaml {
		return nil, nil, fmt.Errorf("unknown xenstored kind %q", kind)
	}
	version, err := XenVersion(root)
	if err != nil {
		return nil, nil, err
	}
	bin := filepath.Join(root, "/usr/lib/xen-"+version+"/bin", map[Kind]string{C: "xenstored", OCaml: "oxenstored"}[kind])
	if err := checkPrerequisites(kind, root, bin); err != nil {
		return nil, nil, err
	}
	shim, err := buildShim()
	if err != nil {
		return nil, nil, err
	}
	// os.MkdirTemp, not a test's TempDir: socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "xsd-"+string(kind)[:1]+"-")
	if err != nil {
		return nil, nil, err
	}
	d := &Daemon{Kind: kind, Root: root, XenVersion: version, Socket: filepath.Join(dir, "socket"), Dir: dir, bin: bin, shim: shim}
	stop := func() {
		d.Kill()
		os.RemoveAll(dir)
	}
	if root != "" {
		// A chrooted daemon sees only its root and its own directory: the shim
		// goes there too.
		if d.shim, err = copyShim(shim, dir); err != nil {
			stop()
			return nil, nil, err
		}
	}
	if err := d.start(); err != nil {
		stop()
		return nil, nil, err
	}
	return d, stop, nil
}

// Env returns the environment that points xenstore-* tools, libxenstore and
// xenstore.Dial at this daemon.
func (d *Daemon) Env() []string { return []string{"XENSTORED_PATH=" + d.Socket} }

// Kill sends SIGKILL to the daemon by pid and waits until it is reaped. Killing
// a daemon that is not running is a no-op.
func (d *Daemon) Kill() error {
	if d.exited == nil {
		return nil
	}
	select {
	case <-d.exited:
		return nil
	default:
	}
	if err := syscall.Kill(d.Pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill %s pid %d: %w", d.Kind, d.Pid, err)
	}
	<-d.exited
	return nil
}

// Restart kills the daemon if it runs and starts it again on the same socket
// path with a fresh, empty store (plus /local/domain/0); Pid changes.
func (d *Daemon) Restart() error {
	if err := d.Kill(); err != nil {
		return err
	}
	return d.start()
}

// start launches the daemon, waits until it answers and creates
// /local/domain/0, which xen-init-dom0 would create on a real host.
func (d *Daemon) start() error {
	for _, f := range []string{"socket", "xenstored.pid", "oxenstored.pid"} {
		os.Remove(filepath.Join(d.Dir, f))
	}
	logFile, err := os.OpenFile(filepath.Join(d.Dir, "daemon.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close()

	var cmd *exec.Cmd
	switch {
	case d.Root != "":
		cmd, err = d.chrootCommand()
		if err != nil {
			return err
		}
	case d.Kind == C:
		cmd = exec.Command(d.bin, "--no-fork", "--pid-file", filepath.Join(d.Dir, "xenstored.pid"))
		// A minimal environment: an inherited XENSTORED_PATH would make
		// cxenstored bind that path instead of $XENSTORED_RUNDIR/socket.
		cmd.Env = []string{
			"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
			"XENSTORED_RUNDIR=" + d.Dir,
			"LD_PRELOAD=" + d.shim.lib,
			"XSFAKE_PORT=" + d.shim.port,
			"XSFAKE_KVA=" + d.shim.kva,
		}
	case d.Kind == OCaml:
		target, err := oxenstoredMountTarget()
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(d.Dir, "oxenstored.conf"), []byte(oxenstoredConf(d.Dir, d.shim)), 0o644); err != nil {
			return err
		}
		// unshare without --fork execs sh, which execs env, which execs
		// oxenstored: the pid we started is the daemon's.
		cmd = exec.Command("unshare", "-m", "--propagation", "private", "sh", "-c",
			`mount --bind "$1" "$2" && exec env LD_PRELOAD="$3" "$4" --no-fork --config-file "$1/oxenstored.conf"`,
			"sh", d.Dir, target, d.shim.lib, d.bin)
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Pdeathsig: a test binary that dies without cleanup takes its daemons along.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", d.Kind, err)
	}
	d.Pid = cmd.Process.Pid
	exited := make(chan struct{})
	d.exited = exited
	go func() {
		cmd.Wait()
		close(exited)
	}()
	if err := d.waitReady(); err != nil {
		d.Kill()
		return fmt.Errorf("%s (pid %d, dir %s): %w\n--- daemon.log ---\n%s", d.Kind, d.Pid, d.Dir, err, d.logTail())
	}
	return nil
}

// waitReady waits for the socket to answer, checks that Pid is the daemon
// itself, and creates /local/domain/0.
func (d *Daemon) waitReady() error {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	var c *xenstore.Client
	for {
		var err error
		if c, err = xenstore.DialUnix(ctx, d.Socket); err == nil {
			break
		}
		select {
		case <-d.exited:
			return errors.New("daemon exited during start")
		case <-ctx.Done():
			return fmt.Errorf("socket %s did not answer: %w", d.Socket, err)
		case <-time.After(5 * time.Millisecond):
		}
	}
	defer c.Close()
	if exe, err := os.Readlink("/proc/" + strconv.Itoa(d.Pid) + "/exe"); err != nil || exe != d.bin {
		return fmt.Errorf("pid %d runs %q, want %s", d.Pid, exe, d.bin)
	}
	if err := c.Mkdir(ctx, "/local/domain/0"); err != nil {
		return err
	}
	return c.Write(ctx, "/local/domain/0/name", "Domain-0")
}

func (d *Daemon) logTail() string {
	b, _ := os.ReadFile(filepath.Join(d.Dir, "daemon.log"))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// oxenstoredMountTarget returns where oxenstored's compiled-in socket
// directory (/var/run/xenstored) really is, creating it if missing. The bind
// mount happens in a private mount namespace, so the host never sees it; an
// existing directory is left as it is.
func oxenstoredMountTarget() (string, error) {
	varRun, err := filepath.EvalSymlinks("/var/run")
	if err != nil {
		return "", fmt.Errorf("oxenstored socket directory: %w", err)
	}
	target := filepath.Join(varRun, "xenstored")
	if err := os.Mkdir(target, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return "", fmt.Errorf("create mount target for oxenstored: %w", err)
	}
	return target, nil
}

func oxenstoredConf(dir string, s shimFiles) string {
	return strings.Join([]string{
		"pid-file = " + filepath.Join(dir, "oxenstored.pid"),
		"merge-activate = true",
		"perms-activate = true",
		"quota-activate = true",
		"persistent = false",
		"xenstored-log-file = " + filepath.Join(dir, "oxenstored.log"),
		"xenstored-log-level = info",
		"access-log-file = " + filepath.Join(dir, "oxenstored-access.log"),
		"xenstored-kva = " + s.kva,
		"xenstored-port = " + s.port,
		"",
	}, "\n")
}

func checkPrerequisites(kind Kind, root, bin string) error {
	need := []string{"gcc"}
	if kind == OCaml || root != "" {
		need = append(need, "unshare", "mount", "sh")
		if os.Geteuid() != 0 {
			return fmt.Errorf("%s needs root (a private mount namespace): run the tests as root", bin)
		}
	}
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("%s not found: run scripts/setup.sh (installs xen-utils --no-install-recommends): %w", bin, err)
	}
	for _, tool := range need {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found: run scripts/setup.sh: %w", tool, err)
		}
	}
	return nil
}

// shimFiles are the built shim and the two files it substitutes for
// /proc/xen/xsd_port (a bare "1", no newline: oxenstored's int_of_string)
// and /proc/xen/xsd_kva (one zero page).
type shimFiles struct{ lib, port, kva string }

var (
	shimOnce sync.Once
	shim     shimFiles
	shimErr  error
)

// buildShim compiles testdata/xsfake.c into a cache directory keyed by the source's
// hash, once per machine. Every file is written under a temporary name and
// renamed, so concurrent test binaries never see a partial file.
func buildShim() (shimFiles, error) {
	shimOnce.Do(func() { shim, shimErr = buildShimOnce() })
	return shim, shimErr
}

func buildShimOnce() (shimFiles, error) {
	sum := sha256.Sum256(shimSource)
	dir := filepath.Join(os.TempDir(), "xenblkd-xsfake-"+hex.EncodeToString(sum[:8]))
	s := shimFiles{
		lib:  filepath.Join(dir, "libxsfake.so"),
		port: filepath.Join(dir, "xsd_port"),
		kva:  filepath.Join(dir, "xsd_kva"),
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return s, fmt.Errorf("shim cache: %w", err)
	}
	if err := writeAtomic(s.port, []byte("1")); err != nil {
		return s, err
	}
	if err := writeAtomic(s.kva, make([]byte, 4096)); err != nil {
		return s, err
	}
	if _, err := os.Stat(s.lib); err == nil {
		return s, nil
	}
	src, err := os.CreateTemp(dir, "xsfake-*.c")
	if err != nil {
		return s, err
	}
	defer os.Remove(src.Name())
	if _, err := src.Write(shimSource); err != nil {
		src.Close()
		return s, err
	}
	src.Close()
	tmp := strings.TrimSuffix(src.Name(), ".c") + ".so"
	defer os.Remove(tmp)
	out, err := exec.Command("gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", tmp, src.Name(), "-ldl").CombinedOutput()
	if err != nil {
		return s, fmt.Errorf("build shim: gcc: %w\n%s", err, out)
	}
	if err := os.Rename(tmp, s.lib); err != nil {
		return s, fmt.Errorf("build shim: %w", err)
	}
	return s, nil
}

func writeAtomic(path string, b []byte) error {
	if old, err := os.ReadFile(path); err == nil && string(old) == string(b) {
		return nil
	}
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// XenVersion returns the version X.Y of the Xen tools in root ("" for the
// host): the highest /usr/lib/xen-X.Y that has a xenstored.
func XenVersion(root string) (string, error) {
	bins, _ := filepath.Glob(filepath.Join(root, "/usr/lib/xen-*/bin/xenstored"))
	best, bestKey := "", [2]int{-1, -1}
	for _, bin := range bins {
		v := strings.TrimPrefix(filepath.Base(filepath.Dir(filepath.Dir(bin))), "xen-")
		major, minor, ok := strings.Cut(v, ".")
		ma, err1 := strconv.Atoi(major)
		mi, err2 := strconv.Atoi(minor)
		if !ok || err1 != nil || err2 != nil {
			continue
		}
		if key := [2]int{ma, mi}; key[0] > bestKey[0] || key[0] == bestKey[0] && key[1] > bestKey[1] {
			best, bestKey = v, key
		}
	}
	if best == "" {
		where := root
		if where == "" {
			where = "the host"
		}
		return "", fmt.Errorf("no /usr/lib/xen-X.Y/bin/xenstored in %s: run scripts/setup.sh (installs xen-utils --no-install-recommends)", where)
	}
	return best, nil
}

// chrootCommand runs the daemon chrooted in d.Root, in a private mount
// namespace where a tmpfs covers the root's /run and d.Dir is bind-mounted on
// innerDir: the cached root is never written, and the socket d.Dir/socket is
// the same file on both sides. unshare and chroot exec without forking, so
// the pid started is the daemon's.
func (d *Daemon) chrootCommand() (*exec.Cmd, error) {
	inner := strings.TrimPrefix(d.bin, d.Root)
	env := []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LD_PRELOAD=" + d.shim.lib}
	var args []string
	switch d.Kind {
	case C:
		env = append(env, "XENSTORED_RUNDIR="+innerDir, "XSFAKE_PORT="+d.shim.port, "XSFAKE_KVA="+d.shim.kva)
		args = []string{inner, "--no-fork", "--pid-file", innerDir + "/xenstored.pid"}
	case OCaml:
		if err := os.WriteFile(filepath.Join(d.Dir, "oxenstored.conf"), []byte(oxenstoredConf(innerDir, d.shim)), 0o644); err != nil {
			return nil, err
		}
		args = []string{inner, "--no-fork", "--config-file", innerDir + "/oxenstored.conf"}
	}
	script := `R=$1 D=$2 I=$3; shift 3
mount -t tmpfs -o mode=755 xsd-run "$R/run" && mkdir -p "$R$I" && mount --bind "$D" "$R$I" &&
mount -t proc proc "$R/proc" && exec chroot "$R" env -i "$@"`
	cmd := exec.Command("unshare", append([]string{"-m", "--propagation", "private", "sh", "-c", script, "sh", d.Root, d.Dir, innerDir}, append(env, args...)...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	return cmd, nil
}

// copyShim copies the shim's files into dir, for a daemon that sees dir as
// innerDir, and returns their paths as the daemon sees them.
func copyShim(s shimFiles, dir string) (shimFiles, error) {
	inner := shimFiles{}
	for _, f := range []struct {
		from, name string
		to         *string
	}{
		{s.lib, "libxsfake.so", &inner.lib},
		{s.port, "xsd_port", &inner.port},
		{s.kva, "xsd_kva", &inner.kva},
	} {
		b, err := os.ReadFile(f.from)
		if err != nil {
			return inner, fmt.Errorf("copy shim: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dir, f.name), b, 0o755); err != nil {
			return inner, fmt.Errorf("copy shim: %w", err)
		}
		*f.to = innerDir + "/" + f.name
	}
	return inner, nil
}
