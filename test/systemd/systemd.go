// Package systemd boots a real systemd (the host's, Debian 12: 252; or that of
// another root file system, Options.Root: the cached Debian 13 root's 257) as
// PID 1 of a throw-away sandbox, for tests of the fd store, restarts and
// crashes.
//
// The sandbox never touches the host: new pid/mount/uts/ipc/net/cgroup
// namespaces, an overlay root (lower = / or Options.Root, read-only; upper =
// tmpfs), a tmpfs
// /dev holding only mknod'd nodes (null, zero, full, random, urandom, tty,
// loop-control and /dev/loopN for every number up to the highest existing one
// + 512: loop numbers are global, and a tmpfs /dev gets no node for a device
// the kernel creates later), private /tmp and /run, read-only /sys and
// /proc/sys, and its own cgroup2 subtree. Every unit must say
// DefaultDependencies=no, and a `systemd --test` dry run must show jobs for
// the test's own units only before systemd really starts. Booting systemd on
// the host root, even in new namespaces, would empty the host's /tmp
// (tmpfiles), re-own /dev (udevd) and change sysctls (docs/fdstore.md,
// "Tests").
//
// Loop devices made inside the sandbox are real host loop devices. Closing
// the sandbox kills its PID 1, which kills every process in it and closes
// every fd the fd store held, so AUTOCLEAR devices detach.
package systemd

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/testenv"
)

//go:embed sandbox.sh
var sandboxScript []byte

// Bind shares a host path with the sandbox, at the same path.
type Bind struct {
	Path     string
	ReadOnly bool
}

// Options describe one sandbox.
type Options struct {
	// Units maps unit file names ("fdtest.service") to their content; they
	// are installed in /run/systemd/system. Each must contain
	// DefaultDependencies=no.
	Units map[string]string
	// Target is the unit systemd starts at boot (--unit=); it must be one of
	// Units.
	Target string
	// Binds are host paths visible in the sandbox at the same path. Units
	// should log with StandardOutput=append:<a bound path>: there is no
	// journald in the sandbox.
	Binds []Bind
	// Env is set for every unit (DefaultEnvironment=), "KEY=value" each.
	Env []string
	// LogLevel of systemd's own log (Sandbox.ConsoleLog); default "debug".
	LogLevel string
	// Timeout for boot and for each command; default 60s.
	Timeout time.Duration
	// Root is the root file system the sandbox's overlay is made of (its
	// systemd is the one booted); "" is the host's /. The cached Debian 13
	// root (test/trixie) boots systemd 257.
	Root string
}

// Sandbox is a running systemd in a sandbox. Close (also registered with
// tb.Cleanup by Start) tears it down.
type Sandbox struct {
	tb      testing.TB
	dir     string
	cgroup  string
	cmd     *exec.Cmd
	pid1    int
	timeout time.Duration
	closed  bool
}

var sandboxCount atomic.Int64

// Start boots systemd in a new sandbox and waits until opts.Target's start
// job has finished. It skips the test (visibly, also without -v) if the
// kernel or the privileges lack what a sandbox needs, and fails it if
// anything else goes wrong.
func Start(tb testing.TB, opts Options) *Sandbox {
	tb.Helper()
	cgroupRoot := checkPrerequisites(tb, opts.Root)
	if opts.Timeout == 0 {
		opts.Timeout = 60 * time.Second
	}
	if opts.LogLevel == "" {
		opts.LogLevel = "debug"
	}
	if _, ok := opts.Units[opts.Target]; !ok {
		tb.Fatalf("systemd sandbox: target %q is not one of the units", opts.Target)
	}
	s := &Sandbox{tb: tb, dir: tb.TempDir(), timeout: opts.Timeout}
	// The state dir is bound into the sandbox; keep it private to root.
	if err := os.Chmod(s.dir, 0o700); err != nil {
		tb.Fatal(err)
	}
	s.writeRoot(opts)

	removeStaleCgroups(cgroupRoot)
	s.cgroup = filepath.Join(cgroupRoot, fmt.Sprintf("xenblkd-test-%d-%d", os.Getpid(), sandboxCount.Add(1)))
	if err := os.Mkdir(s.cgroup, 0o755); err != nil {
		tb.Fatalf("systemd sandbox: create cgroup: %v", err)
	}
	tb.Cleanup(s.Close)
	cg, err := os.Open(s.cgroup)
	if err != nil {
		tb.Fatal(err)
	}
	defer cg.Close()

	var binds strings.Builder
	for _, b := range opts.Binds {
		if !filepath.IsAbs(b.Path) || strings.ContainsAny(b.Path, "\n ") {
			tb.Fatalf("systemd sandbox: bind %q: want an absolute path without spaces", b.Path)
		}
		mode := "rw"
		if b.ReadOnly {
			mode = "ro"
		}
		fmt.Fprintf(&binds, "%s %s\n", mode, b.Path)
	}
	logFile, err := os.Create(filepath.Join(s.dir, "sandbox.log"))
	if err != nil {
		tb.Fatal(err)
	}
	defer logFile.Close()
	// unshare --fork: its child is PID 1 of the new pid namespace;
	// --kill-child and Pdeathsig take the sandbox down if the test dies.
	s.cmd = exec.Command("unshare", "--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--uts",
		"--ipc", "--net", "--cgroup", "--propagation", "private", "/bin/sh", filepath.Join(s.dir, "sandbox.sh"))
	s.cmd.Env = []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"container=xenblkd-test", // systemd's container mode: no kmod, no hostname games
		"SBX_DIR=" + s.dir,
		"SBX_TARGET=" + opts.Target,
		"SBX_BINDS=" + binds.String(),
		"SBX_LOGLEVEL=" + opts.LogLevel,
		"SBX_LOWER=" + cmp.Or(opts.Root, "/"),
	}
	s.cmd.Stdout, s.cmd.Stderr = logFile, logFile
	stdin, err := s.cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	defer stdin.Close()
	s.cmd.SysProcAttr = &unix.SysProcAttr{
		Pdeathsig:   unix.SIGKILL,
		UseCgroupFD: true, // start inside the sandbox's own cgroup (clone3 CLONE_INTO_CGROUP)
		CgroupFD:    int(cg.Fd()),
	}
	if err := s.cmd.Start(); err != nil {
		tb.Fatalf("systemd sandbox: start unshare: %v", err)
	}
	s.pid1 = s.findPid1()

	// The dry run: systemd --test prints the initial transaction's jobs.
	s.waitFor("the dry run", func() bool {
		_, err := os.Stat(filepath.Join(s.dir, "dryrun.done"))
		return err == nil
	})
	dry, _ := os.ReadFile(filepath.Join(s.dir, "dryrun.txt"))
	if err := checkDryRun(dry, opts.Units); err != nil {
		s.fatalf("refusing to boot: %v\ndry run output:\n%s", err, dry)
	}
	if _, err := stdin.Write([]byte("go\n")); err != nil {
		s.fatalf("start systemd: %v", err)
	}
	stdin.Close()

	s.waitFor("systemd's private socket", func() bool {
		_, err := os.Stat(fmt.Sprintf("/proc/%d/root/run/systemd/private", s.pid1))
		return err == nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	// is-system-running --wait returns once the boot transaction is done.
	out, _ := s.exec(ctx, "systemctl", "is-system-running", "--wait")
	if state, _ := s.Systemctl("is-active", opts.Target); strings.TrimSpace(state) != "active" {
		s.fatalf("target %s is %q after boot (system: %q)", opts.Target, strings.TrimSpace(state), strings.TrimSpace(out))
	}
	return s
}

// checkPrerequisites skips the test (testenv: a failure under
// XENBLKD_TEST_STRICT=1) if a sandbox cannot be built here, and returns the
// cgroup2 mount point.
func checkPrerequisites(tb testing.TB, root string) string {
	tb.Helper()
	skip := func(format string, args ...any) {
		tb.Helper()
		testenv.Skip(tb, "systemd sandbox unavailable: "+fmt.Sprintf(format, args...))
	}
	if os.Geteuid() != 0 {
		skip("needs root (mount, mknod, namespaces, cgroups)")
	}
	fs, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		tb.Fatal(err)
	}
	for _, want := range []string{"overlay", "cgroup2", "tmpfs", "devpts"} {
		if !regexp.MustCompile(`(?m)\s` + want + `$`).Match(fs) {
			skip("kernel has no %s filesystem", want)
		}
	}
	for _, ns := range []string{"pid", "mnt", "uts", "ipc", "net", "cgroup"} {
		if _, err := os.Stat("/proc/self/ns/" + ns); err != nil {
			skip("kernel has no %s namespaces", ns)
		}
	}
	cgroupRoot := cgroup2Mount()
	if cgroupRoot == "" {
		skip("no cgroup2 hierarchy mounted (looked for fstype cgroup2 in /proc/self/mountinfo)")
	}
	for _, tool := range []string{"/lib/systemd/systemd", "/usr/bin/unshare", "/usr/bin/nsenter", "/usr/bin/setpriv"} {
		if _, err := os.Stat(tool); err != nil {
			tb.Fatalf("systemd sandbox: %s missing (install systemd and util-linux): %v", tool, err)
		}
	}
	// The sandbox's own systemd and setpriv come from its root.
	if root != "" {
		for _, tool := range []string{"/lib/systemd/systemd", "/usr/bin/setpriv", "/usr/bin/systemctl"} {
			if _, err := os.Stat(filepath.Join(root, tool)); err != nil {
				tb.Fatalf("systemd sandbox: %s missing in %s: %v", tool, root, err)
			}
		}
	}
	return cgroupRoot
}

func cgroup2Mount() string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent maj:min root mountpoint options ... - fstype source superoptions
		fields := strings.Fields(sc.Text())
		sep := slices.Index(fields, "-")
		if sep < 0 || sep+1 >= len(fields) || len(fields) < 5 {
			continue
		}
		if fields[sep+1] == "cgroup2" && fields[3] == "/" {
			return fields[4]
		}
	}
	return ""
}

// writeRoot prepares the state dir the sandbox script builds its root from.
func (s *Sandbox) writeRoot(opts Options) {
	tb := s.tb
	tb.Helper()
	must := func(err error) {
		tb.Helper()
		if err != nil {
			tb.Fatalf("systemd sandbox: %v", err)
		}
	}
	must(os.WriteFile(filepath.Join(s.dir, "sandbox.sh"), sandboxScript, 0o755))
	must(os.WriteFile(filepath.Join(s.dir, "console.log"), nil, 0o600))
	for _, d := range []string{"units", "system.conf.d", "dev"} {
		must(os.Mkdir(filepath.Join(s.dir, d), 0o755))
	}
	for name, content := range opts.Units {
		if strings.ContainsRune(name, '/') {
			tb.Fatalf("systemd sandbox: unit name %q", name)
		}
		if !regexp.MustCompile(`(?m)^\s*DefaultDependencies\s*=\s*no\s*$`).MatchString(content) {
			tb.Fatalf("systemd sandbox: unit %s lacks DefaultDependencies=no (without it systemd pulls in sysinit.target and tmpfiles, udev, ...)", name)
		}
		must(os.WriteFile(filepath.Join(s.dir, "units", name), []byte(content), 0o644))
	}
	var conf strings.Builder
	conf.WriteString("[Manager]\n")
	for _, kv := range opts.Env {
		if !strings.Contains(kv, "=") || strings.ContainsAny(kv, "\"\n") {
			tb.Fatalf("systemd sandbox: Env %q: want KEY=value without quotes or newlines", kv)
		}
		fmt.Fprintf(&conf, "DefaultEnvironment=\"%s\"\n", kv)
	}
	must(os.WriteFile(filepath.Join(s.dir, "system.conf.d", "xenblkd-test.conf"), []byte(conf.String()), 0o644))

	dev := filepath.Join(s.dir, "dev")
	nodes := []struct {
		name         string
		mode         uint32
		major, minor uint32
	}{
		{"null", unix.S_IFCHR | 0o666, 1, 3}, {"zero", unix.S_IFCHR | 0o666, 1, 5},
		{"full", unix.S_IFCHR | 0o666, 1, 7}, {"random", unix.S_IFCHR | 0o666, 1, 8},
		{"urandom", unix.S_IFCHR | 0o666, 1, 9}, {"tty", unix.S_IFCHR | 0o666, 5, 0},
		{"loop-control", unix.S_IFCHR | 0o600, 10, 237},
	}
	for _, n := range nodes {
		must(unix.Mknod(filepath.Join(dev, n.name), n.mode, int(unix.Mkdev(n.major, n.minor))))
	}
	for i := 0; i <= maxLoopNumber()+512; i++ {
		must(unix.Mknod(filepath.Join(dev, "loop"+strconv.Itoa(i)), unix.S_IFBLK|0o600, int(unix.Mkdev(7, uint32(i)))))
	}
}

// maxLoopNumber is the highest loop device number that exists now.
func maxLoopNumber() int {
	highest := 0
	for _, pattern := range []string{"/dev/loop*", "/sys/block/loop*"} {
		paths, _ := filepath.Glob(pattern)
		for _, p := range paths {
			if n, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(p), "loop")); err == nil && n > highest {
				highest = n
			}
		}
	}
	return highest
}

var dryRunJob = regexp.MustCompile(`(?m)^\s*-> Job \d+:\s*\n\s*Action: (\S+) -> (\S+)`)

// checkDryRun accepts the dry run only if it lists jobs, all for our units.
func checkDryRun(out []byte, units map[string]string) error {
	jobs := dryRunJob.FindAllSubmatch(out, -1)
	if len(jobs) == 0 {
		return errors.New("no jobs found in the `systemd --test` output")
	}
	var foreign []string
	for _, j := range jobs {
		if _, ok := units[string(j[1])]; !ok {
			foreign = append(foreign, string(j[1])+" "+string(j[2]))
		}
	}
	if len(foreign) > 0 {
		sort.Strings(foreign)
		return fmt.Errorf("the boot would start units that are not the test's: %s", strings.Join(foreign, ", "))
	}
	return nil
}

// findPid1 returns the host pid of the sandbox's PID 1 (unshare's child).
func (s *Sandbox) findPid1() int {
	var pid int
	s.waitFor("the sandbox's PID 1", func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", s.cmd.Process.Pid, s.cmd.Process.Pid))
		if err != nil {
			return false
		}
		f := strings.Fields(string(b))
		if len(f) == 0 {
			return false
		}
		pid, err = strconv.Atoi(f[0])
		return err == nil
	})
	return pid
}

func (s *Sandbox) waitFor(what string, ok func() bool) {
	s.tb.Helper()
	deadline := time.Now().Add(s.timeout)
	for !ok() {
		if s.cmd.ProcessState != nil || time.Now().After(deadline) {
			s.fatalf("timed out waiting for %s", what)
		}
		if err := unix.Kill(s.cmd.Process.Pid, 0); err != nil {
			s.fatalf("sandbox exited while waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (s *Sandbox) fatalf(format string, args ...any) {
	s.tb.Helper()
	log, _ := os.ReadFile(filepath.Join(s.dir, "sandbox.log"))
	console, _ := os.ReadFile(s.ConsoleLog())
	s.tb.Fatalf("systemd sandbox: "+format+"\n--- sandbox.log:\n%s\n--- console.log (last 4 KiB):\n%s",
		append(args, log, tail(console, 4096))...)
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// Pid1 is the host pid of the sandbox's systemd.
func (s *Sandbox) Pid1() int { return s.pid1 }

// Dir is the sandbox's state directory on the host, bound read-write into
// the sandbox at the same path (a place for logs and files to exchange).
func (s *Sandbox) Dir() string { return s.dir }

// ConsoleLog is the host path of systemd's own log (its /dev/console).
func (s *Sandbox) ConsoleLog() string { return filepath.Join(s.dir, "console.log") }

// Exec runs a command inside the sandbox (its mount and pid namespaces and
// root) and returns its combined output.
func (s *Sandbox) Exec(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	defer cancel()
	return s.exec(ctx, args...)
}

func (s *Sandbox) exec(ctx context.Context, args ...string) (string, error) {
	if s.closed {
		return "", errors.New("systemd sandbox: closed")
	}
	nsenter := []string{"-t", strconv.Itoa(s.pid1), "-m", "-p", "-r", "-w", "--"}
	cmd := exec.CommandContext(ctx, "nsenter", append(nsenter, args...)...)
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "LANG=C.UTF-8"}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("%s: %w", strings.Join(args, " "), err)
	}
	return out.String(), err
}

// Systemctl runs systemctl with args inside the sandbox.
func (s *Sandbox) Systemctl(args ...string) (string, error) {
	return s.Exec(append([]string{"systemctl", "--no-pager"}, args...)...)
}

// Show returns one property of a unit (systemctl show -p NAME --value).
func (s *Sandbox) Show(unit, property string) (string, error) {
	out, err := s.Systemctl("show", "-p", property, "--value", unit)
	return strings.TrimSpace(out), err
}

// Close kills the sandbox's PID 1 (and with it every process in its pid
// namespace, which closes every fd they and the fd store held), waits for
// it, and removes its cgroup. Safe to call more than once.
func (s *Sandbox) Close() {
	if s.closed {
		return
	}
	s.closed = true
	if s.cmd != nil && s.cmd.Process != nil {
		if s.pid1 > 0 {
			unix.Kill(s.pid1, unix.SIGKILL)
		}
		s.cmd.Process.Kill() // unshare; --kill-child also SIGKILLs PID 1
		s.cmd.Wait()
	}
	if s.cgroup != "" {
		// The pid namespace dies with its PID 1, but the kernel reaps its
		// processes asynchronously: wait until the subtree is empty.
		deadline := time.Now().Add(s.timeout)
		for populated(s.cgroup) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if err := removeCgroup(s.cgroup); err != nil {
			s.tb.Errorf("systemd sandbox: remove cgroup: %v", err)
		}
	}
}

// removeStaleCgroups removes the empty cgroups of sandboxes whose test
// process died without cleaning up (a -timeout panic skips t.Cleanup; the
// sandbox itself dies with it through Pdeathsig and --kill-child).
func removeStaleCgroups(root string) {
	dirs, _ := filepath.Glob(filepath.Join(root, "xenblkd-test-*-*"))
	for _, dir := range dirs {
		pid, err := strconv.Atoi(strings.Split(filepath.Base(dir), "-")[2])
		if err != nil || unix.Kill(pid, 0) == nil || populated(dir) {
			continue // not ours, or its test is still running
		}
		removeCgroup(dir)
	}
}

func populated(cgroup string) bool {
	b, err := os.ReadFile(filepath.Join(cgroup, "cgroup.events"))
	return err == nil && bytes.Contains(b, []byte("populated 1"))
}

// removeCgroup removes a cgroup and the ones systemd made below it,
// deepest first (cgroupfs directories are removed with rmdir only).
func removeCgroup(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroup(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	return unix.Rmdir(dir)
}
