// Package testenv decides what a test does when this machine lacks something
// it needs (root, a package, a kernel feature): skip, as a developer's
// non-root `go test ./...` expects, or fail, where XENBLKD_TEST_STRICT=1 says
// that every test must run (CI sets it: a run as root on a machine that
// scripts/setup.sh prepared has no reason to skip anything).
//
// A package whose tests skip this way has a TestMain that calls Main (or
// Run), which says after the tests what was skipped and why, one line per
// package, also without -v (see Run).
package testenv

import (
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"testing"
)

// StrictEnv is the variable that turns every Skip into a failure.
const StrictEnv = "XENBLKD_TEST_STRICT"

// Strict reports whether StrictEnv is set to 1.
func Strict() bool { return os.Getenv(StrictEnv) == "1" }

// skipped is every test this binary skipped through Skip, by reason.
var skipped struct {
	sync.Mutex
	byWhy map[string][]string // reason -> test names, in skip order
}

// Skip skips t, saying why, or fails it when Strict.
func Skip(t testing.TB, why string) {
	t.Helper()
	if Strict() {
		t.Fatalf("%s=1, and this test would skip: %s", StrictEnv, why)
	}
	record(t, why)
	t.Skip(why)
}

// SkipPart is for a check at the end of a test, or in a helper, that this
// machine cannot make (a lint whose tool is missing): the rest of the test
// runs either way; the part fails the test when Strict, and is otherwise
// logged and counted in the package's summary.
func SkipPart(t testing.TB, why string) {
	t.Helper()
	if Strict() {
		t.Errorf("%s=1, and part of this test would skip: %s", StrictEnv, why)
		return
	}
	record(t, "in part: "+why)
	t.Log("skipped: " + why)
}

func record(t testing.TB, why string) {
	skipped.Lock()
	defer skipped.Unlock()
	if skipped.byWhy == nil {
		skipped.byWhy = map[string][]string{}
	}
	skipped.byWhy[why] = append(skipped.byWhy[why], t.Name())
}

// Skipf is Skip with a format.
func Skipf(t testing.TB, format string, args ...any) {
	t.Helper()
	Skip(t, fmt.Sprintf(format, args...))
}

// RequireRoot skips (or fails, when Strict) unless the test runs as root;
// what says what the test does that needs root.
func RequireRoot(t testing.TB, what string) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root: "+what)
	}
}

// Main is a TestMain that runs the tests and says what Skip skipped:
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
func Main(m *testing.M) { os.Exit(Run(m)) }

// Run runs m's tests and then, if any skipped through Skip, prints one
// line saying how many, why and which, and returns m.Run's status. The line
// goes to stdout, where -v, -json and a failed package's output show it;
// without -v, go test prints nothing of a package that passed, so the line
// also goes to the terminal (/dev/tty), if there is one, for the developer
// who ran a plain `go test ./...`.
func Run(m *testing.M) int {
	code := m.Run()
	skipped.Lock()
	line := summary(pkgName(), skipped.byWhy)
	skipped.Unlock()
	if line != "" {
		report(line)
	}
	return code
}

// SkipPackage is for a TestMain whose whole package cannot run here: it
// says so as Run does and returns the status to exit with (0, or 1 when
// Strict).
func SkipPackage(why string) int {
	if Strict() {
		fmt.Printf("FAIL %s: %s=1, and every test of this package would skip: %s\n", pkgName(), StrictEnv, why)
		return 1
	}
	report(fmt.Sprintf("SKIP %s: every test skipped: %s", pkgName(), why))
	return 0
}

// summary is the line Run prints: "SKIP pkg: 3 tests skipped: needs
// root: ... (TestA, TestB); no dpkg (TestC)", counting each test once;
// empty if nothing skipped.
func summary(pkg string, byWhy map[string][]string) string {
	tests := map[string]bool{}
	whys := make([]string, 0, len(byWhy))
	for why, names := range byWhy {
		whys = append(whys, why)
		for _, name := range names {
			tests[name] = true
		}
	}
	n := len(tests)
	if n == 0 {
		return ""
	}
	sort.Strings(whys)
	parts := make([]string, 0, len(whys))
	for _, why := range whys {
		names := byWhy[why]
		const shown = 4
		list := strings.Join(names[:min(len(names), shown)], ", ")
		if len(names) > shown {
			list += fmt.Sprintf(" and %d more", len(names)-shown)
		}
		parts = append(parts, fmt.Sprintf("%s (%s)", why, list))
	}
	noun := "tests"
	if n == 1 {
		noun = "test"
	}
	return fmt.Sprintf("SKIP %s: %d %s skipped: %s", pkg, n, noun, strings.Join(parts, "; "))
}

func report(line string) {
	fmt.Println(line)
	if verbose() {
		return // stdout is shown
	}
	if tty, err := os.OpenFile("/dev/tty", os.O_WRONLY, 0); err == nil {
		io.WriteString(tty, line+"\n")
		tty.Close()
	}
}

// verbose reports whether go test shows this binary's stdout anyway (-v,
// or -json, which runs the binary with -test.v=test2json).
func verbose() bool {
	f := flag.Lookup("test.v")
	return f != nil && f.Value.String() != "false"
}

// pkgName is the import path of the package under test (the test binary's
// main package is "<import path>.test").
func pkgName() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Path != "" {
		return strings.TrimSuffix(bi.Path, ".test")
	}
	return strings.TrimSuffix(os.Args[0], ".test")
}
