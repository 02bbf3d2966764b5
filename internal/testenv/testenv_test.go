package testenv

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

func TestMain(m *testing.M) {
	if os.Getenv("TESTENV_CHILD") == "package" {
		os.Exit(SkipPackage("the package's reason"))
	}
	Main(m)
}

// TestSkipFailsWhenStrict runs a skipping test in a child process, with and
// without StrictEnv, and checks the verdict each time, and that the child's
// TestMain (Main) names what it skipped.
func TestSkipFailsWhenStrict(t *testing.T) {
	if os.Getenv("TESTENV_CHILD") == "1" {
		SkipPart(t, "a lint")
		Skip(t, "the child's reason")
		return
	}
	for _, tc := range []struct {
		strict   string
		wantFail bool
		want     string
	}{
		{"", false, "SKIP xenblkd/internal/testenv: 1 test skipped: in part: a lint (TestSkipFailsWhenStrict); the child's reason (TestSkipFailsWhenStrict)\n"},
		{"1", true, StrictEnv + "=1, and part of this test would skip: a lint"},
		{"1", true, StrictEnv + "=1, and this test would skip: the child's reason"},
	} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSkipFailsWhenStrict$", "-test.v")
		cmd.Env = append(os.Environ(), "TESTENV_CHILD=1", StrictEnv+"="+tc.strict)
		out, err := cmd.CombinedOutput()
		if gotFail := err != nil; gotFail != tc.wantFail {
			t.Errorf("%s=%q: failed=%v, want %v; output:\n%s", StrictEnv, tc.strict, gotFail, tc.wantFail, out)
		}
		if !strings.Contains(string(out), tc.want) {
			t.Errorf("%s=%q: %q is not in the output:\n%s", StrictEnv, tc.strict, tc.want, out)
		}
	}
}

// TestSkipPackage: a TestMain that cannot run its package here exits 0
// saying why, or 1 when strict.
func TestSkipPackage(t *testing.T) {
	for _, tc := range []struct {
		strict string
		want   string
		code   int
	}{
		{"", "SKIP xenblkd/internal/testenv: every test skipped: the package's reason\n", 0},
		{"1", "FAIL xenblkd/internal/testenv: " + StrictEnv + "=1, and every test of this package would skip: the package's reason\n", 1},
	} {
		cmd := exec.Command(os.Args[0], "-test.v")
		cmd.Env = append(os.Environ(), "TESTENV_CHILD=package", StrictEnv+"="+tc.strict)
		out, err := cmd.CombinedOutput()
		if code := cmd.ProcessState.ExitCode(); code != tc.code || string(out) != tc.want {
			t.Errorf("%s=%q: exit %d (%v), output %q; want %d, %q", StrictEnv, tc.strict, code, err, out, tc.code, tc.want)
		}
	}
}

func TestSummary(t *testing.T) {
	for _, tt := range []struct {
		byWhy map[string][]string
		want  string
	}{
		{nil, ""},
		{map[string][]string{"no dpkg": {"TestDeb"}}, "SKIP p: 1 test skipped: no dpkg (TestDeb)"},
		{map[string][]string{
			"needs root: loop devices": {"TestA", "TestB", "TestC", "TestD", "TestE", "TestF/sub"},
			"no curl":                  {"TestG", "TestA"},
		}, "SKIP p: 7 tests skipped: needs root: loop devices (TestA, TestB, TestC, TestD and 2 more); no curl (TestG, TestA)"},
	} {
		if got := summary("p", tt.byWhy); got != tt.want {
			t.Errorf("summary(%v) = %q, want %q", tt.byWhy, got, tt.want)
		}
	}
}
