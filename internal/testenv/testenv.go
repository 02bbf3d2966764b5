// Package testenv decides what a test does when this machine lacks something
// it needs (root, a package, a kernel feature): skip, as a developer's
// non-root `go test ./...` expects, or fail, where XENBLKD_TEST_STRICT=1 says
// that every test must run (CI sets it: a run as root on a machine that
// scripts/setup.sh prepared has no reason to skip anything).
package testenv

import (
	"fmt"
	"os"
	"testing"
)

// StrictEnv is the variable that turns every Skip into a failure.
const StrictEnv = "XENBLKD_TEST_STRICT"

// Strict reports whether StrictEnv is set to 1.
func Strict() bool { return os.Getenv(StrictEnv) == "1" }

// Skip skips t, saying why, or fails it when Strict.
func Skip(t testing.TB, why string) {
	t.Helper()
	if Strict() {
		t.Fatalf("%s=1, and this test would skip: %s", StrictEnv, why)
	}
	t.Skip(why)
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
