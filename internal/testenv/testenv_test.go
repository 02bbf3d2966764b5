package testenv

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
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

// TestNoBareSkips: every skip in the tree goes through this package, or
// says, in a comment just above it, why it is no environment gate (a
// -short size cut, an input too large to matter): a bare t.Skip would
// pass under XENBLKD_TEST_STRICT=1 and hide a test that never ran.
func TestNoBareSkips(t *testing.T) {
	const marker = "Not an environment gate"
	root := filepath.Join("..", "..")
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasPrefix(path, filepath.Join(root, "internal", "testenv")) {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.ParseComments)
		if err != nil {
			return err
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok || (sel.Sel.Name != "Skip" && sel.Sel.Name != "Skipf" && sel.Sel.Name != "SkipNow") {
				return true
			}
			if id, ok := sel.X.(*ast.Ident); ok && id.Name == "testenv" {
				return true
			}
			line := fset.Position(call.Pos()).Line
			for _, cg := range f.Comments {
				if end := fset.Position(cg.End()).Line; end < line && end >= line-2 && strings.Contains(cg.Text(), marker) {
					return true
				}
			}
			t.Errorf("%s: a bare %s: use testenv.Skip, or say above it why it is %q", fset.Position(call.Pos()), sel.Sel.Name, marker)
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
