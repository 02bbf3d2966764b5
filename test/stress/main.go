// Command stress runs the unit and integration test packages many times
// under CPU and I/O load (`make test-stress`, docs/testing.md), and reports
// every test that failed at least once: how many runs, how many failures,
// and the first failure's output. A test that fails only under load waits
// for something other than the condition it asserts (a sleep, an iteration
// count, a neighbour's state): that is what this finds.
//
// Each run is one `go test -race -json -count=N -cpu LIST PACKAGES`, with a
// stress-ng load started beside it and stopped after it, both inside one
// hold of the machine's heavy-run lock (flock), so that other heavy runs
// (a testbed under QEMU) interleave between runs instead of under the load.
//
//	go run ./test/stress -runs 5 ./internal/... ./cmd/xenblkd/
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type config struct {
	runs    int
	count   int
	cpu     string
	load    string // stress-ng arguments; empty: no load
	timeout time.Duration
	lock    string
	keep    string // directory for each run's JSON stream
	run     string // -run pattern
	pkgs    []string
}

func main() {
	var c config
	flag.IntVar(&c.runs, "runs", 5, "stressed runs of the packages (each one go test)")
	flag.IntVar(&c.count, "count", 1, "go test -count within a run")
	flag.StringVar(&c.cpu, "cpu", "1,2,4", "go test -cpu: GOMAXPROCS values each test runs under")
	flag.StringVar(&c.load, "load", "--cpu 2 --hdd 1 --hdd-bytes 128M", "stress-ng arguments for the load beside each run (empty: none)")
	flag.DurationVar(&c.timeout, "timeout", 30*time.Minute, "go test -timeout of one run")
	flag.StringVar(&c.lock, "lock", "/tmp/xenblkd-heavy.lock", "lock file held (flock) for each run, load included (empty: none)")
	flag.StringVar(&c.keep, "keep", "", "directory to keep each run's go test -json stream in (default: a new one under $TMPDIR)")
	flag.StringVar(&c.run, "run", "", "go test -run pattern (default: every test)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: stress [flags] packages...\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	c.pkgs = flag.Args()
	if len(c.pkgs) == 0 || c.runs < 1 || c.count < 1 {
		flag.Usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(stress(ctx, c))
}

func stress(ctx context.Context, c config) int {
	if c.load != "" {
		if _, err := exec.LookPath("stress-ng"); err != nil {
			fmt.Fprintln(os.Stderr, "stress: stress-ng not found (scripts/setup.sh installs it):", err)
			return 1
		}
	}
	if c.keep == "" {
		dir, err := os.MkdirTemp("", "xenblkd-stress-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "stress:", err)
			return 1
		}
		c.keep = dir
	} else if err := os.MkdirAll(c.keep, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "stress:", err)
		return 1
	}
	fmt.Printf("stress: %d runs of go test -race -count=%d -cpu %s %s; load: stress-ng %s; streams in %s\n",
		c.runs, c.count, c.cpu, strings.Join(c.pkgs, " "), orNone(c.load), c.keep)
	col := newCollector()
	start := time.Now()
	clean, streak, longest, done := 0, 0, 0, 0
	for i := 1; i <= c.runs && ctx.Err() == nil; i++ {
		if i > 1 && c.lock != "" {
			// The kernel wakes every waiter when the lock is released, and
			// this process would win the race to take it again at once:
			// a moment off lets a waiting heavy run (a testbed) go first.
			select {
			case <-ctx.Done():
			case <-time.After(2 * time.Second):
			}
		}
		res, err := oneRun(ctx, c, col, i)
		if ctx.Err() != nil {
			fmt.Printf("run %d/%d: interrupted\n", i, c.runs)
			break
		}
		done++
		failed := len(res.failed)
		if err != nil && failed == 0 {
			// go test failed and no event says why (a build or vet error):
			// what it printed is the failure.
			col.count(testKey{Package: "go test"}, i, true, err.Error()+"\n"+strings.Join(res.stray, "\n"))
			failed = 1
		}
		if failed == 0 {
			clean++
			streak++
			longest = max(longest, streak)
		} else {
			streak = 0
		}
		fmt.Printf("run %d/%d: %d test executions, %d failed, %s%s\n", i, c.runs, res.tests, failed,
			res.elapsed.Round(time.Second), names(res.failed))
	}
	fmt.Printf("\nstress: %d of %d runs passed with 0 failures (%d in a row at the end, %d at most), %s\n\n",
		clean, done, streak, longest, time.Since(start).Round(time.Second))
	if col.report(os.Stdout) > 0 || done < c.runs {
		return 1
	}
	return 0
}

// oneRun holds the lock, starts the load, runs go test and stops the load.
func oneRun(ctx context.Context, c config, col *collector, run int) (runResult, error) {
	unlock, err := lock(ctx, c.lock)
	if err != nil {
		return runResult{}, err
	}
	defer unlock()
	stopLoad, err := startLoad(c.load)
	if err != nil {
		return runResult{}, err
	}
	defer stopLoad()

	args := []string{"test", "-race", "-json", fmt.Sprintf("-count=%d", c.count), "-cpu", c.cpu,
		"-timeout", c.timeout.String()}
	if c.run != "" {
		args = append(args, "-run", c.run)
	}
	args = append(args, c.pkgs...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1") // -race needs cgo
	// Interrupted: go test passes the signal on and reports what ran.
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = time.Minute
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return runResult{}, err
	}
	f, err := os.Create(filepath.Join(c.keep, fmt.Sprintf("run-%03d.json", run)))
	if err != nil {
		return runResult{}, err
	}
	defer f.Close()
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return runResult{}, err
	}
	res := col.read(io.TeeReader(bufio.NewReader(stdout), f), run)
	err = cmd.Wait()
	res.elapsed = time.Since(t0)
	if err != nil {
		err = fmt.Errorf("go test: %v\n%s", err, stderr.String())
	}
	return res, err
}

// lock takes an exclusive flock on path, saying so when it has to wait; an
// interrupt while it waits ends the wait (the process then exits, which
// drops the lock if the blocked flock took it meanwhile).
func lock(ctx context.Context, path string) (unlock func(), err error) {
	if path == "" {
		return func() {}, nil
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o666)
	if err != nil {
		return nil, err
	}
	if inherited(f) {
		// Run under flock(1) on the same file: the caller holds the lock
		// for the whole run already, and waiting for it would never end.
		f.Close()
		return func() {}, nil
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); errors.Is(err, unix.EWOULDBLOCK) {
		fmt.Printf("stress: waiting for %s (another heavy run)\n", path)
		got := make(chan error, 1)
		go func() { got <- unix.Flock(int(f.Fd()), unix.LOCK_EX) }()
		select {
		case err = <-got:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	} else if err != nil {
		f.Close()
		return nil, fmt.Errorf("flock %s: %w", path, err)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("flock %s: %w", path, err)
	}
	return func() { f.Close() }, nil // closing the only fd releases the lock
}

// inherited reports whether this process has another fd open on f's file
// from before it started (flock(1) passes its locked fd to the command).
func inherited(f *os.File) bool {
	var want unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &want); err != nil {
		return false
	}
	fds, _ := os.ReadDir("/proc/self/fd")
	for _, e := range fds {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd == int(f.Fd()) {
			continue
		}
		var st unix.Stat_t
		if unix.Fstat(fd, &st) == nil && st.Dev == want.Dev && st.Ino == want.Ino {
			return true
		}
	}
	return false
}

// startLoad starts stress-ng with args in a process group of its own; stop
// ends that group (stress-ng and its workers) and waits for stress-ng.
func startLoad(args string) (stop func(), err error) {
	if args == "" {
		return func() {}, nil
	}
	dir, err := os.MkdirTemp("", "xenblkd-stress-load-") // --hdd's files
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("stress-ng", append(strings.Fields(args), "--temp-path", dir, "--quiet")...)
	// Pdeathsig: stress-ng ends its workers when it gets SIGTERM, so a
	// SIGKILL of this tool does not leave the load running.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start stress-ng %s: %w", args, err)
	}
	return func() {
		// The group's id is stress-ng's pid: only what we started.
		unix.Kill(-cmd.Process.Pid, unix.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			unix.Kill(-cmd.Process.Pid, unix.SIGKILL)
			<-done
		}
		os.RemoveAll(dir)
	}, nil
}

func names(ks []testKey) string {
	if len(ks) == 0 {
		return ""
	}
	var s []string
	for _, k := range ks {
		s = append(s, k.String())
	}
	return ": " + strings.Join(s, ", ")
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}
