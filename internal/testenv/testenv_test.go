package testenv

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestSkipFailsWhenStrict runs a skipping test in a child process, with and
// without StrictEnv, and checks the verdict each time.
func TestSkipFailsWhenStrict(t *testing.T) {
	if os.Getenv("TESTENV_CHILD") == "1" {
		Skip(t, "the child's reason")
		return
	}
	for _, tc := range []struct {
		strict   string
		wantFail bool
	}{{"", false}, {"1", true}} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSkipFailsWhenStrict$", "-test.v")
		cmd.Env = append(os.Environ(), "TESTENV_CHILD=1", StrictEnv+"="+tc.strict)
		out, err := cmd.CombinedOutput()
		if gotFail := err != nil; gotFail != tc.wantFail {
			t.Errorf("%s=%q: failed=%v, want %v; output:\n%s", StrictEnv, tc.strict, gotFail, tc.wantFail, out)
		}
		if !strings.Contains(string(out), "the child's reason") {
			t.Errorf("%s=%q: the reason is not in the output:\n%s", StrictEnv, tc.strict, out)
		}
	}
}
