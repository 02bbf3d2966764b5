package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action      string
	Package     string
	Test        string
	Output      string
	Elapsed     float64
	ImportPath  string // build-output events: the package being built
	FailedBuild string // a package's fail event: the build that failed
}

// testKey names a test (or, with Test empty, a package's own output: a
// build failure, a panic or timeout outside any one test, TestMain).
type testKey struct{ Package, Test string }

func (k testKey) String() string {
	if k.Test == "" {
		return k.Package + " (package)"
	}
	return k.Package + " " + k.Test
}

// tally is what all runs saw of one test.
type tally struct {
	runs, failures int
	firstFailure   string // output of the first failed run, trimmed
	firstRun       int    // which run (1-based) failed first
}

// runResult is one `go test -json` invocation, summed up.
type runResult struct {
	tests    int // test executions finished (pass, fail or skip)
	failed   []testKey
	elapsed  time.Duration
	stray    []string // lines that were not events
	parseErr error
}

// count records one execution of k; output is what it printed, kept if
// this is its first failure.
func (c *collector) count(k testKey, run int, failed bool, output string) {
	t := c.tests[k]
	if t == nil {
		t = &tally{}
		c.tests[k] = t
	}
	t.runs++
	if failed {
		t.failures++
		if t.failures == 1 {
			t.firstFailure, t.firstRun = trimLines(output, maxLines), run
		}
	}
}

// collector reads the events of successive runs into one table.
type collector struct {
	tests map[testKey]*tally
}

func newCollector() *collector { return &collector{tests: map[testKey]*tally{}} }

// maxLines bounds the failure output kept per test.
const maxLines = 60

// read consumes one run's event stream (run is its 1-based number). Output
// is buffered per test since its last "run" event, so parallel tests'
// interleaved lines stay apart; a test that started and never finished (its
// package panicked or timed out) counts as failed with what it printed.
func (c *collector) read(r io.Reader, run int) runResult {
	var res runResult
	out := map[testKey]*strings.Builder{}
	running := map[testKey]bool{}
	builds := map[string]*strings.Builder{} // build output by ImportPath
	finish := func(k testKey, failed bool) {
		var output string
		if b := out[k]; b != nil {
			output = b.String()
		}
		c.count(k, run, failed, output)
		res.tests++
		if failed {
			res.failed = append(res.failed, k)
		}
		delete(running, k)
		delete(out, k)
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if err := json.Unmarshal(line, &e); err != nil || e.Action == "" {
			// go test's own messages (a vet or build error) are not events.
			res.stray = append(res.stray, string(line))
			continue
		}
		if e.Action == "build-output" {
			if builds[e.ImportPath] == nil {
				builds[e.ImportPath] = &strings.Builder{}
			}
			builds[e.ImportPath].WriteString(e.Output)
			continue
		}
		k := testKey{e.Package, e.Test}
		switch e.Action {
		case "start":
			out[k] = &strings.Builder{}
		case "run":
			out[k] = &strings.Builder{}
			running[k] = true
		case "output":
			if out[k] == nil {
				out[k] = &strings.Builder{}
			}
			out[k].WriteString(e.Output)
		case "pass", "skip":
			if e.Test == "" {
				c.unfinished(e.Package, running, out, finish)
				c.count(k, run, false, "")
				delete(out, k)
				continue
			}
			finish(k, false)
		case "fail":
			if e.Test == "" {
				c.unfinished(e.Package, running, out, finish)
				if anyIn(res.failed, e.Package) {
					c.count(k, run, false, "") // its tests' failures say why
					delete(out, k)
					continue
				}
				// No test of the package failed: the package did (a build
				// error, TestMain, a crash outside any test): its output.
				if b := builds[e.FailedBuild]; b != nil && out[k] != nil {
					b.WriteString(out[k].String())
					out[k] = b
				}
				finish(k, true)
				continue
			}
			finish(k, true)
		}
	}
	res.parseErr = sc.Err()
	return res
}

// unfinished fails every test of pkg still running when pkg ended.
func (c *collector) unfinished(pkg string, running map[testKey]bool, out map[testKey]*strings.Builder, finish func(testKey, bool)) {
	var ks []testKey
	for k := range running {
		if k.Package == pkg {
			ks = append(ks, k)
		}
	}
	sort.Slice(ks, func(i, j int) bool { return ks[i].Test < ks[j].Test })
	for _, k := range ks {
		if b := out[testKey{Package: pkg}]; b != nil { // the panic or timeout is the package's output
			out[k].WriteString("--- the package's output when it ended:\n")
			out[k].WriteString(b.String())
		}
		finish(k, true)
	}
}

func anyIn(ks []testKey, pkg string) bool {
	for _, k := range ks {
		if k.Package == pkg {
			return true
		}
	}
	return false
}

// trimLines keeps the first third and the last two thirds of n lines of
// s: a failure's assertion is usually near its start, and a panic, a
// timeout or the end of a log dump near its end.
func trimLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) <= n {
		return strings.Join(lines, "\n")
	}
	head := n / 3
	tail := n - head
	return strings.Join(lines[:head], "\n") + fmt.Sprintf("\n[%d lines cut]\n", len(lines)-n) + strings.Join(lines[len(lines)-tail:], "\n")
}

// report writes the table of every test that failed at least once: runs,
// failures, and the first failure's output.
func (c *collector) report(w io.Writer) (failing int) {
	var ks []testKey
	for k, t := range c.tests {
		if t.failures > 0 {
			ks = append(ks, k)
		}
	}
	sort.Slice(ks, func(i, j int) bool {
		if a, b := c.tests[ks[i]].failures, c.tests[ks[j]].failures; a != b {
			return a > b
		}
		return ks[i].String() < ks[j].String()
	})
	if len(ks) == 0 {
		fmt.Fprintf(w, "no test failed (%d tests, %d executions)\n", len(c.tests), c.executions())
		return 0
	}
	fmt.Fprintf(w, "%d tests failed at least once:\n\n", len(ks))
	fmt.Fprintf(w, "%8s %8s  %s\n", "RUNS", "FAILED", "TEST")
	for _, k := range ks {
		t := c.tests[k]
		fmt.Fprintf(w, "%8d %8d  %s\n", t.runs, t.failures, k)
	}
	for _, k := range ks {
		t := c.tests[k]
		fmt.Fprintf(w, "\n=== %s: first failure (run %d):\n", k, t.firstRun)
		for _, l := range strings.Split(t.firstFailure, "\n") {
			fmt.Fprintf(w, "    %s\n", l)
		}
	}
	return len(ks)
}

func (c *collector) executions() int {
	n := 0
	for _, t := range c.tests {
		n += t.runs
	}
	return n
}
