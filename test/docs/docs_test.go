// Package docs checks that every command in README.md and docs/*.md is
// exercised: run for real against the built binary, checked against the
// Makefile, the binary's --help or the tree, covered by a named test, or
// listed in allowlist with the reason it cannot run here. It also checks
// docs/configuration.md against the code (every daemon flag, every
// environment variable) and that every docs page is linked from README.md.
package docs

import (
	"bufio"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// allowlist: commands (by prefix) that the doc check does not run, and why.
var allowlist = []struct{ prefix, reason string }{
	{"xl ", "needs a Xen host: exercised by the testbed suite (make test-e2e, test/testbed/e2e.sh)"},
	{"xenstore-read ", "needs a Xen host's xenstored: exercised by the testbed suite"},
	{"systemctl ", "changes the host's services and needs systemd as PID 1: the unit runs in test/systemd's sandbox and in the testbed"},
	{"journalctl ", "reads the host's journal of the installed unit: nothing to exercise without it"},
	{"systemd-analyze fdstore", "needs systemd >= 254 running xenblkd (docs/fdstore.md); the fd store is tested in test/systemd"},
	{"ls -l /proc/1/fd", "inspects the host's PID 1; the fd store is tested in test/systemd"},
	{"apt install ./build/", "installs on the host: the package's contents are tested by test/install (make deb)"},
	{"apt remove xenblkd", "removes from the host: the package's maintainer scripts are tested by test/install"},
	{"install -m 0755 bin/xenblkd /usr/sbin/xenblkd", "writes to the host's /usr/sbin: the same layout is tested by test/install (make install DESTDIR=...)"},
	{"install -m 0755 bin/xenblkd-hotplug /etc/xen/scripts/xenblkd", "writes to the host's /etc/xen: the same layout is tested by test/install (make install DESTDIR=...)"},
	{"install -D -m 0644 /usr/share/doc/xenblkd/examples/metrics-tcp.conf", "writes to the host's /etc/systemd: the drop-in itself runs under real systemd in test/systemd TestProductionUnitDaemon"},
	{"curl ", "metrics: exercised by cmd/xenblkd TestMetricsOverUnixSocketWithCurl and TestMetricsOverTCP against a running daemon"},
	{"man ", "docs/xenblkd.8 is rendered with warnings on by test/install TestManPage"},
	{"setfattr -n user.xenblkd.", "sets a disk's I/O override on an image file: cmd/xenblkd TestIOModeEndToEnd and internal/daemon TestReadDiskIO set the same attributes (setxattr(2)) and attach through the daemon"},
	{"getfattr -d ", "only prints an image's attributes (package attr); what xenblkd reads of them is tested in internal/daemon TestReadDiskIO"},
}

// coveredBy: xenblkd subcommands that cannot run here for real (they need a
// daemon, root, xenstored or loop devices) and the tests that run them.
var coveredBy = map[string]string{
	"daemon": "cmd/xenblkd e2e tests (startDaemon runs it against a real xenstored)",
	"add":    "cmd/xenblkd e2e tests (exec'd as libxl does)",
	"remove": "cmd/xenblkd e2e tests (exec'd as libxl does)",
	"status": "cmd/xenblkd TestStatusCommand (against a running daemon)",
	"takeover": "internal/takeover TestTakeAndUndo and TestRefusals (scratch dpkg root), test/install TestMaintainerScriptsUndoTakeover, " +
		"test/recovery TestTakeoverAdoptsStockDevices, and the testbed group takeover (real dpkg-divert on a Xen dom0)",
}

var (
	root   string // repository root
	binary string // built xenblkd
)

func TestMain(m *testing.M) {
	wd, _ := os.Getwd()
	root = filepath.Join(wd, "..", "..")
	dir, err := os.MkdirTemp("", "xenblkd-docs-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "xenblkd")
	build := exec.Command("go", "build", "-o", binary, "./cmd/xenblkd")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build xenblkd: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// command is one shell command found in a doc.
type command struct {
	file string
	line int
	text string // prompt, env assignments and trailing comment removed
}

func (c command) String() string { return fmt.Sprintf("%s:%d: %s", c.file, c.line, c.text) }

// commandWords start a command line in an indented code block, whose lines
// may also be output, configuration or messages. Every line of a fenced
// block tagged sh, shell, bash or console is a command.
var commandWords = []string{"make", "xenblkd", "/usr/sbin/xenblkd", "bin/xenblkd", "/etc/xen/scripts/xenblkd",
	"go", "curl", "systemctl", "journalctl", "xl", "xenstore-read", "xenstore-ls", "xenstore-write", "apt", "apt-get",
	"install", "ln", "ls", "man", "systemd-analyze", "losetup", "dpkg", "dpkg-deb", "git", "cd", "modprobe"}

var envAssign = regexp.MustCompile(`^[A-Z_][A-Z0-9_]*=[^\s"]*[^\s":]\s+`)

// repoScript: a script of this repository, run from its root.
var repoScript = regexp.MustCompile(`^(\./|test/|scripts/|\.ci/)\S*[^\s/.]$`)

// descriptionColumn: indented blocks may list "command   what it does".
var descriptionColumn = regexp.MustCompile(`\s{3,}\S.*$`)

func docFiles(t *testing.T) []string {
	files, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	return append([]string{filepath.Join(root, "README.md")}, files...)
}

// extract returns the commands in a markdown file's code blocks: fenced
// (```sh and friends) and indented ones.
func extract(t *testing.T, path string) []command {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	rel, _ := filepath.Rel(root, path)
	var out []command
	fence, fenceShell := "", false
	prevBlank, inIndented := true, false
	for i, line := range strings.Split(string(data), "\n") {
		trimmed := strings.TrimSpace(line)
		if fence == "" && strings.HasPrefix(trimmed, "```") {
			fence = "```"
			lang := strings.TrimPrefix(trimmed, "```")
			fenceShell = slices.Contains([]string{"sh", "shell", "bash", "console"}, lang)
			continue
		}
		if fence != "" {
			if strings.HasPrefix(trimmed, "```") {
				fence = ""
				continue
			}
			if !fenceShell || trimmed == "" || strings.HasPrefix(trimmed, "#") {
				continue
			}
			out = append(out, command{rel, i + 1, clean(strings.TrimPrefix(trimmed, "$ "))})
			continue
		}
		indented := strings.HasPrefix(line, "    ") || strings.HasPrefix(line, "\t")
		if indented && (prevBlank || inIndented) && trimmed != "" {
			inIndented = true
			text := trimmed
			for _, p := range []string{"# ", "$ "} {
				text = strings.TrimPrefix(text, p)
			}
			text = clean(descriptionColumn.ReplaceAllString(text, ""))
			first, _, _ := strings.Cut(envAssign.ReplaceAllString(text, ""), " ")
			if slices.Contains(commandWords, first) || repoScript.MatchString(first) {
				out = append(out, command{rel, i + 1, text})
			}
		} else if trimmed != "" {
			inIndented = false
		}
		// An indented block may follow a blank line or a heading (not a paragraph).
		prevBlank = trimmed == "" || strings.HasPrefix(line, "#")
	}
	return out
}

var trailingComment = regexp.MustCompile(`\s+#\s.*$`)

func clean(s string) string { return strings.TrimSpace(trailingComment.ReplaceAllString(s, "")) }

func TestDocCommands(t *testing.T) {
	targets := makeTargets(t)
	commands := subcommands(t)
	n := 0
	for _, f := range docFiles(t) {
		for _, c := range extract(t, f) {
			n++
			if err := check(c, targets, commands); err != nil {
				t.Errorf("%s\n\t%v\n\t(add a test that runs it, or an allowlist entry with the reason, in test/docs)", c, err)
			}
		}
	}
	if n < 10 {
		t.Fatalf("found only %d commands in the docs: the extractor is broken", n)
	}
	t.Logf("%d commands checked", n)
	if testing.Verbose() {
		for _, f := range docFiles(t) {
			for _, c := range extract(t, f) {
				t.Log(c)
			}
		}
	}
}

func check(c command, targets map[string]bool, commands map[string]bool) error {
	text := envAssign.ReplaceAllString(c.text, "")
	for _, a := range allowlist {
		if strings.HasPrefix(text, a.prefix) {
			return nil
		}
	}
	words := strings.Fields(text)
	switch first := words[0]; {
	case first == "make":
		for _, w := range words[1:] {
			if strings.Contains(w, "=") || strings.HasPrefix(w, "-") {
				continue
			}
			if !targets[w] {
				return fmt.Errorf("make target %q is not in the Makefile", w)
			}
		}
		return nil
	case first == "xenblkd" || strings.HasSuffix(first, "/xenblkd"):
		return checkXenblkd(words[1:], commands)
	case first == "go":
		return checkGo(words[1:])
	case strings.Contains(first, "/") && !filepath.IsAbs(first):
		fi, err := os.Stat(filepath.Join(root, first))
		if err != nil || fi.Mode()&0o111 == 0 {
			return fmt.Errorf("%s is not an executable file in the tree", first)
		}
		return nil
	}
	return fmt.Errorf("no test runs %q", words[0])
}

// checkXenblkd runs help and version commands for real, and checks that the
// subcommand exists and each flag is one its --help documents.
func checkXenblkd(args []string, commands map[string]bool) error {
	if len(args) == 0 {
		return fmt.Errorf("xenblkd without a command")
	}
	if slices.Contains([]string{"--help", "-h", "help", "version", "--version"}, args[0]) {
		return run(args...)
	}
	for _, sub := range strings.Split(args[0], "|") {
		if !commands[sub] {
			return fmt.Errorf("xenblkd has no command %q (xenblkd --help)", sub)
		}
		help, err := exec.Command(binary, sub, "--help").Output()
		if err != nil {
			return fmt.Errorf("xenblkd %s --help: %v", sub, err)
		}
		for _, a := range args[1:] {
			if !strings.HasPrefix(a, "-") || a == "--help" {
				continue
			}
			name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
			if !regexp.MustCompile(`(^|[\s\[])--?` + regexp.QuoteMeta(name) + `\b`).Match(help) {
				return fmt.Errorf("xenblkd %s --help does not document %s", sub, a)
			}
		}
		if slices.Contains(args[1:], "--help") {
			if err := run(sub, "--help"); err != nil {
				return err
			}
			continue
		}
		switch sub {
		case "doctor":
			// Read-only checks of this host: run it; 1 (something to fix) is fine.
			cmd := exec.Command(binary, append([]string{sub}, args[1:]...)...)
			cmd.Env = append(os.Environ(), "XENBLKD_SOCKET=/nonexistent/api.sock")
			if err := cmd.Run(); err != nil {
				if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
					return fmt.Errorf("xenblkd %s: %v", strings.Join(args, " "), err)
				}
			}
		default:
			if coveredBy[sub] == "" {
				return fmt.Errorf("xenblkd %s: not run here and no test listed in coveredBy", sub)
			}
		}
	}
	return nil
}

func run(args ...string) error {
	out, err := exec.Command(binary, args...).CombinedOutput()
	if err != nil || len(out) == 0 {
		return fmt.Errorf("xenblkd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// checkGo checks that package paths exist and fuzz targets are defined.
func checkGo(args []string) error {
	if len(args) == 0 || !slices.Contains([]string{"test", "run", "build", "vet"}, args[0]) {
		return fmt.Errorf("go %v: not a command the doc check knows", args)
	}
	var fuzz string
	for i, a := range args {
		if a == "-fuzz" && i+1 < len(args) {
			fuzz = args[i+1]
		}
	}
	for _, a := range args[1:] {
		if !strings.HasPrefix(a, "./") {
			continue
		}
		dir := filepath.Join(root, strings.TrimSuffix(a, "/..."))
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			return fmt.Errorf("package %s does not exist", a)
		}
		if fuzz != "" {
			out, _ := exec.Command("grep", "-rlq", "func "+fuzz+"(", dir).CombinedOutput()
			if err := exec.Command("grep", "-rq", "func "+fuzz+"(", dir).Run(); err != nil {
				return fmt.Errorf("no %s in %s%s", fuzz, a, out)
			}
		}
	}
	return nil
}

// makeTargets returns the rules of the Makefile.
func makeTargets(t *testing.T) map[string]bool {
	data, err := os.ReadFile(filepath.Join(root, "Makefile"))
	if err != nil {
		t.Fatal(err)
	}
	targets := map[string]bool{}
	rule := regexp.MustCompile(`^([A-Za-z0-9_.-]+(?:\s+[A-Za-z0-9_.-]+)*)\s*:([^=]|$)`)
	for _, line := range strings.Split(string(data), "\n") {
		if m := rule.FindStringSubmatch(line); m != nil {
			for _, name := range strings.Fields(m[1]) {
				targets[name] = true
			}
		}
	}
	return targets
}

// subcommands parses the COMMANDS section of `xenblkd --help`.
func subcommands(t *testing.T) map[string]bool {
	out, err := exec.Command(binary, "--help").Output()
	if err != nil {
		t.Fatal(err)
	}
	cmds := map[string]bool{}
	in := false
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "COMMANDS":
			in = true
		case in && line != "" && !strings.HasPrefix(line, " "):
			in = false
		case in && line != "":
			cmds[strings.Fields(line)[0]] = true
		}
	}
	if len(cmds) < 4 {
		t.Fatalf("parsed commands %v from xenblkd --help", cmds)
	}
	return cmds
}

// TestConfigurationComplete: docs/configuration.md lists every flag of
// `xenblkd daemon` (registered in the code and documented by its --help)
// and every environment variable the code reads.
func TestConfigurationComplete(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(root, "docs", "configuration.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(data)
	flags := daemonFlags(t)
	if !slices.Contains(flags, "socket") || !slices.Contains(flags, "metrics-listen") {
		t.Fatalf("found daemon flags %v: the parser is broken", flags)
	}
	help, err := exec.Command(binary, "daemon", "--help").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`(?m)^\s+--([a-z][a-z0-9-]*)`).FindAllStringSubmatch(string(help), -1) {
		if !slices.Contains(flags, m[1]) {
			t.Errorf("xenblkd daemon --help documents --%s, which the code does not register", m[1])
		}
	}
	for _, f := range flags {
		if !strings.Contains(doc, "`--"+f) {
			t.Errorf("docs/configuration.md does not list the daemon flag --%s", f)
		}
		if !strings.Contains(string(help), "--"+f) {
			t.Errorf("xenblkd daemon --help does not document --%s", f)
		}
	}
	for _, v := range envVars(t) {
		if !strings.Contains(doc, "`"+v+"`") {
			t.Errorf("docs/configuration.md does not list the environment variable %s", v)
		}
	}
}

// daemonFlags finds the flags registered on the FlagSet named "daemon" in
// cmd/xenblkd (fs.String("name", ...), fs.BoolVar(&x, "name", ...), ...).
func daemonFlags(t *testing.T) []string {
	fset := token.NewFileSet()
	files, _ := filepath.Glob(filepath.Join(root, "cmd", "xenblkd", "*.go"))
	var flags []string
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(file, func(n ast.Node) bool {
			fn, ok := n.(*ast.FuncDecl)
			if !ok || fn.Body == nil {
				return true
			}
			sets := map[string]bool{} // variables holding flag.NewFlagSet("daemon", ...)
			ast.Inspect(fn.Body, func(n ast.Node) bool {
				if as, ok := n.(*ast.AssignStmt); ok && len(as.Lhs) == 1 && len(as.Rhs) == 1 {
					if call, ok := as.Rhs[0].(*ast.CallExpr); ok && isSel(call.Fun, "flag", "NewFlagSet") && len(call.Args) > 0 {
						if lit, ok := call.Args[0].(*ast.BasicLit); ok && lit.Value == `"daemon"` {
							if id, ok := as.Lhs[0].(*ast.Ident); ok {
								sets[id.Name] = true
							}
						}
					}
				}
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				sel, ok := call.Fun.(*ast.SelectorExpr)
				if !ok {
					return true
				}
				recv, ok := sel.X.(*ast.Ident)
				if !ok || !sets[recv.Name] {
					return true
				}
				idx := 0
				if strings.HasSuffix(sel.Sel.Name, "Var") || sel.Sel.Name == "Var" {
					idx = 1
				}
				if sel.Sel.Name == "Func" || sel.Sel.Name == "BoolFunc" {
					idx = 0
				}
				if len(call.Args) > idx {
					if lit, ok := call.Args[idx].(*ast.BasicLit); ok && lit.Kind == token.STRING {
						name, _ := strconv.Unquote(lit.Value)
						flags = append(flags, name)
					}
				}
				return true
			})
			return false
		})
	}
	return flags
}

func isSel(e ast.Expr, pkg, name string) bool {
	sel, ok := e.(*ast.SelectorExpr)
	if !ok || sel.Sel.Name != name {
		return false
	}
	id, ok := sel.X.(*ast.Ident)
	return ok && id.Name == pkg
}

// envVars finds the variables read with os.Getenv, os.LookupEnv or a
// getenv function value in the shipped code (cmd/, internal/).
func envVars(t *testing.T) []string {
	re := regexp.MustCompile(`(?:Getenv|LookupEnv|getenv)\("([A-Z_][A-Z0-9_]*)"\)`)
	seen := map[string]bool{}
	for _, dir := range []string{"cmd", "internal"} {
		filepath.WalkDir(filepath.Join(root, dir), func(p string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") ||
				strings.Contains(p, string(filepath.Separator)+"testdata"+string(filepath.Separator)) {
				return nil
			}
			data, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range re.FindAllStringSubmatch(string(data), -1) {
				seen[m[1]] = true
			}
			return nil
		})
	}
	var out []string
	for v := range seen {
		out = append(out, v)
	}
	slices.Sort(out)
	if !slices.Contains(out, "XENBLKD_SOCKET") {
		t.Fatalf("found environment variables %v: the scan is broken", out)
	}
	return out
}

// TestReadmeLinksEveryPage: the README's documentation list links every page.
func TestReadmeLinksEveryPage(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	pages, _ := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	for _, p := range pages {
		link := "(docs/" + filepath.Base(p)
		if !strings.Contains(string(data), link+")") && !strings.Contains(string(data), link+"#") {
			t.Errorf("README.md does not link docs/%s", filepath.Base(p))
		}
	}
	for _, want := range []string{"make test", "make demo"} {
		if !strings.Contains(string(data), "    "+want) {
			t.Errorf("README quick start lost %q", want)
		}
	}
}

// TestExtract pins the extractor on the kinds of blocks the docs use.
func TestExtract(t *testing.T) {
	md := "text\n\n    make build                # comment\n    DESTDIR=/x make install\n    DOMAIN  DEVID\n\n" +
		"```sh\n# a comment\nxenblkd status --json\n```\n\n```text\nxenblkd daemon is not running\n```\n\n    # xenblkd status\n"
	p := filepath.Join(t.TempDir(), "x.md")
	if err := os.WriteFile(p, []byte(md), 0o644); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range extract(t, p) {
		got = append(got, c.text)
	}
	want := []string{"make build", "DESTDIR=/x make install", "xenblkd status --json", "xenblkd status"}
	if !slices.Equal(got, want) {
		t.Errorf("got %q, want %q", got, want)
	}
}

// TestArchitectureListsEveryPackage: docs/architecture.md's layout names
// every package under internal/ (a moved or new package is described where a
// newcomer looks first), and its API list names every operation.
func TestArchitectureListsEveryPackage(t *testing.T) {
	data, err := os.ReadFile(filepath.Join(root, "docs", "architecture.md"))
	if err != nil {
		t.Fatal(err)
	}
	dirs, err := os.ReadDir(filepath.Join(root, "internal"))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		if d.IsDir() && !strings.Contains(string(data), "internal/"+d.Name()+"/") {
			t.Errorf("docs/architecture.md does not describe internal/%s/", d.Name())
		}
	}
	for _, op := range []string{"add", "remove", "status", "adopt", "ping"} {
		if !strings.Contains(string(data), `"`+op+`"`) {
			t.Errorf("docs/architecture.md's API does not list the operation %q", op)
		}
	}
}
