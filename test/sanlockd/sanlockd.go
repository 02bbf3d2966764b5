// Package sanlockd starts private instances of Debian's real sanlock daemon
// for tests: each one a simulated host, with its own run directory (socket,
// pid file) and its watchdog off (-w 0), sharing lockspace files that tests
// make in their own directories.
//
// No mount namespace and no preload shim are needed: sanlock 3.8 takes its run
// directory from SANLOCK_RUN_DIR, and SANLOCK_PRIVILEGED=0 skips the
// setrlimit(RLIMIT_MEMLOCK/RLIMIT_RTPRIO) calls that fail where the caller
// lacks CAP_SYS_RESOURCE (and the mlockall and real-time priority a production
// daemon wants). Nothing under /run/sanlock is touched; sanlock still opens
// /var/log/sanlock.log, but logs nothing there (-L -1).
//
// Safety on a shared machine: -w 0 means sanlock never opens /dev/watchdog
// nor talks to wdmd, so losing a lockspace never resets the machine.
package sanlockd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"xenblkd/internal/sanlock"
	"xenblkd/internal/testenv"
)

// Bin is the sanlock daemon of Debian's sanlock package.
const Bin = "/usr/sbin/sanlock"

// startTimeout bounds how long the daemon may take to answer on its socket;
// it only turns a broken setup into an error instead of a hang.
const startTimeout = 20 * time.Second

// Daemon is a running private sanlock daemon: one simulated host.
type Daemon struct {
	Dir string // run directory: sanlock.sock, sanlock.pid, daemon.log
	Pid int

	exited chan struct{} // closed when the daemon has been reaped
}

// Start starts a private sanlock daemon, skipping the test (testenv.Skip)
// without root or without the sanlock package, and stops it by pid at cleanup.
func Start(tb testing.TB) *Daemon {
	tb.Helper()
	testenv.RequireRoot(tb, "the sanlock daemon runs as root")
	if _, err := os.Stat(Bin); err != nil {
		testenv.Skipf(tb, "%s missing (Debian package sanlock; scripts/setup.sh installs it)", Bin)
	}
	d, stop, err := StartMain()
	if err != nil {
		tb.Fatalf("start sanlock: %v", err)
	}
	tb.Cleanup(stop)
	return d
}

// StartMain is Start for programs (make bench): it returns the daemon and a
// stop func that kills it by pid and removes its directory.
func StartMain() (*Daemon, func(), error) {
	if _, err := os.Stat(Bin); err != nil {
		return nil, nil, fmt.Errorf("%s missing (Debian package sanlock; scripts/setup.sh installs it)", Bin)
	}
	// os.MkdirTemp, not a test's TempDir: socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "sld-")
	if err != nil {
		return nil, nil, err
	}
	d := &Daemon{Dir: dir}
	stop := func() {
		d.Kill()
		os.RemoveAll(dir)
	}
	if err := d.start(); err != nil {
		stop()
		return nil, nil, err
	}
	return d, stop, nil
}

// Client returns a client of this daemon.
func (d *Daemon) Client() sanlock.Client { return sanlock.Client{Dir: d.Dir} }

// Env points sanlock's own tools (sanlock client ...) at this daemon.
func (d *Daemon) Env() []string { return []string{"SANLOCK_RUN_DIR=" + d.Dir} }

func (d *Daemon) start() error {
	logFile, err := os.OpenFile(filepath.Join(d.Dir, "daemon.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close()
	// -D: foreground, log to stderr; -w 0: no watchdog; -l 0: no mlockall;
	// -U/-G root: stay root (the test's lockspace files are root's).
	cmd := exec.Command(Bin, "daemon", "-D", "-w", "0", "-l", "0", "-L", "-1", "-U", "root", "-G", "root")
	cmd.Env = []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"SANLOCK_RUN_DIR=" + d.Dir,
		"SANLOCK_PRIVILEGED=0",
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Pdeathsig: a test binary that dies without cleanup takes its daemons
	// along (sanlock's helper child exits when the daemon does).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", Bin, err)
	}
	d.Pid = cmd.Process.Pid
	exited := make(chan struct{})
	d.exited = exited
	go func() {
		cmd.Wait()
		close(exited)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	for {
		_, err := d.Client().Version(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("sanlock (dir %s) exited during start:\n%s", d.Dir, d.LogTail())
		case <-ctx.Done():
			d.Kill()
			return fmt.Errorf("sanlock (pid %d, dir %s) did not answer: %w\n%s", d.Pid, d.Dir, err, d.LogTail())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// Kill sends SIGKILL to the daemon by pid and waits until it is reaped: to
// the other hosts, this host has died (its delta lease is no longer renewed).
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
		return fmt.Errorf("kill sanlock pid %d: %w", d.Pid, err)
	}
	<-d.exited
	return nil
}

// LogTail is the end of the daemon's log, for failure messages.
func (d *Daemon) LogTail() string {
	b, _ := os.ReadFile(filepath.Join(d.Dir, "daemon.log"))
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// NewLockspace makes a lockspace file of 1 MiB in dir and initialises it
// through d with io_timeout ioTimeout seconds (0: sanlock's 10). A short
// io_timeout makes joining (2*io_timeout) and a dead host's expiry
// (8*io_timeout + 60 s) short enough for tests.
func NewLockspace(tb testing.TB, d *Daemon, dir, name string, ioTimeout uint32) sanlock.Lockspace {
	tb.Helper()
	ls, err := d.InitLockspace(dir, name, ioTimeout)
	if err != nil {
		tb.Fatal(err)
	}
	return ls
}

// InitLockspace is NewLockspace for programs.
func (d *Daemon) InitLockspace(dir, name string, ioTimeout uint32) (sanlock.Lockspace, error) {
	path := filepath.Join(dir, name+".lockspace")
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); err != nil {
		return sanlock.Lockspace{}, err
	}
	ls := sanlock.Lockspace{Name: name, Disk: sanlock.Disk{Path: path}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := d.Client().WriteLockspace(ctx, ls, ioTimeout); err != nil {
		return ls, fmt.Errorf("init lockspace %s: %w\n%s", path, err, d.LogTail())
	}
	return ls, nil
}
