// Package entry tests the C hotplug entry (cmd/xenblkd-hotplug) on its own:
// both builds (static as shipped, and dynamic with ASan and UBSan) are exec'd
// as libxl execs the script, against a fake daemon on a unix socket. The
// hand-over target is this test binary in a helper mode that reports the
// argv and environment it got, so every test sees exactly what the entry
// passed on. The end-to-end tests in cmd/xenblkd run the entry against the
// real daemon, xenstored and loop devices.
package entry

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"xenblkd/internal/hotplug"
	"xenblkd/internal/testenv"
	"xenblkd/test/build"
)

// builds are the entry's two builds, by name.
var builds = map[string]string{}

// handedOver is what the hand-over helper reports (on stdout, as JSON).
type handedOver struct {
	Args  []string
	Reply *string // XENBLKD_ENTRY_REPLY
	Error *string // XENBLKD_ENTRY_ERROR
	Path  string  // XENBUS_PATH, to see the environment is passed on
}

// handoverExit is the helper's exit status, unlike any the entry returns.
const handoverExit = 42

func TestMain(m *testing.M) {
	switch os.Getenv("XENBLKD_TEST_HELPER") {
	case "handover":
		h := handedOver{Args: os.Args, Path: os.Getenv("XENBUS_PATH")}
		// Quoted: JSON would replace bytes that are not UTF-8.
		if v, ok := os.LookupEnv("XENBLKD_ENTRY_REPLY"); ok {
			v = strconv.Quote(v)
			h.Reply = &v
		}
		if v, ok := os.LookupEnv("XENBLKD_ENTRY_ERROR"); ok {
			v = strconv.Quote(v)
			h.Error = &v
		}
		json.NewEncoder(os.Stdout).Encode(h)
		os.Exit(handoverExit)
	case "nobody-daemon":
		os.Exit(nobodyDaemon())
	}
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "xenblkd-entry-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	for name, flags := range map[string][]string{"static": build.EntryCFlags, "sanitize": build.SanitizerCFlags} {
		// The built-in hand-over target is this binary; the tests that
		// need the real Go entry set XENBLKD_BIN.
		if builds[name], err = build.Entry(dir, "entry-"+name, self, flags); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
	return testenv.Run(m)
}

// fakeDaemon answers each connection with the next of its replies (a reply
// is written as given: include the newline) and records the requests.
type fakeDaemon struct {
	socket string
	mu     sync.Mutex
	got    []string // guarded by mu
}

// reply is what the fake daemon does with one connection.
type reply struct {
	chunks []string // written one at a time, 20 ms apart
	// closeEarly closes without reading the request.
	closeEarly bool
}

func startFake(t testing.TB, replies ...reply) *fakeDaemon {
	t.Helper()
	f := &fakeDaemon{socket: filepath.Join(t.TempDir(), "api.sock")}
	l, err := net.Listen("unix", f.socket)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { l.Close(); <-done })
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			c, err := l.Accept()
			if err != nil {
				return
			}
			r := reply{chunks: []string{`{"ok":true}` + "\n"}}
			if i < len(replies) {
				r = replies[i]
			}
			if !r.closeEarly {
				line, _ := bufio.NewReader(c).ReadString('\n')
				f.mu.Lock()
				f.got = append(f.got, line)
				f.mu.Unlock()
			}
			for j, chunk := range r.chunks {
				if j > 0 {
					time.Sleep(20 * time.Millisecond)
				}
				c.Write([]byte(chunk))
			}
			c.Close()
		}
	}()
	return f
}

func (f *fakeDaemon) requests() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.got...)
}

// result is one run of the entry.
type result struct {
	code   int
	stderr string
	over   *handedOver // nil: no hand-over
}

// run execs the entry as libxl does: argv [script, args...], the hotplug
// environment, stdin /dev/null.
func run(t testing.TB, entry string, args []string, env ...string) result {
	t.Helper()
	cmd := exec.Command(entry, args...)
	cmd.Args[0] = "/etc/xen/scripts/xenblkd"
	cmd.Env = append([]string{"XENBLKD_TEST_HELPER=handover", "XENBUS_TYPE=vbd", "XENBUS_BASE_PATH=backend",
		"script=/etc/xen/scripts/xenblkd", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}, env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	case err != nil:
		t.Fatalf("exec %s: %v", entry, err)
	}
	if r.code == handoverExit {
		r.over = &handedOver{}
		if err := json.Unmarshal(stdout.Bytes(), r.over); err != nil {
			t.Fatalf("hand-over helper output %q: %v", stdout.String(), err)
		}
		for _, v := range []*string{r.over.Reply, r.over.Error} {
			if v != nil {
				*v, _ = strconv.Unquote(*v)
			}
		}
	}
	if strings.Contains(r.stderr, "Sanitizer") || strings.Contains(r.stderr, "runtime error") {
		t.Fatalf("sanitizer finding:\n%s", r.stderr)
	}
	return r
}

func each(t *testing.T, f func(t *testing.T, entry string)) {
	for _, name := range []string{"static", "sanitize"} {
		t.Run(name, func(t *testing.T) { f(t, builds[name]) })
	}
}

const be = "backend/vbd/7/51712"

func TestSuccess(t *testing.T) {
	each(t, func(t *testing.T, entry string) {
		for _, tt := range []struct {
			name   string
			action string
			reply  reply
		}{
			{"add", "add", reply{chunks: []string{`{"ok":true,"attachment":{"domid":7,"devid":51712,"device":"/dev/loop3"}}` + "\n"}}},
			{"remove", "remove", reply{chunks: []string{`{"ok":true}` + "\n"}}},
			{"reply in pieces", "add", reply{chunks: []string{`{"ok":`, `true`, `}` + "\n"}}},
		} {
			t.Run(tt.name, func(t *testing.T) {
				f := startFake(t, tt.reply)
				r := run(t, entry, []string{tt.action}, "XENBUS_PATH="+be, "XENBLKD_SOCKET="+f.socket)
				if r.code != 0 || r.stderr != "" {
					t.Fatalf("exit %d, stderr %q, hand-over %+v; want 0 and nothing", r.code, r.stderr, r.over)
				}
				want := fmt.Sprintf(`{"op":%q,"path":%q}`+"\n", tt.action, be)
				if got := f.requests(); len(got) != 1 || got[0] != want {
					t.Errorf("requests %q; want one %q", got, want)
				}
			})
		}
	})
}

// TestHandover: each way off the success path hands over with the same argv
// and environment, saying how far the entry got, and sends nothing twice.
func TestHandover(t *testing.T) {
	str := func(s string) *string { return &s }
	each(t, func(t *testing.T, entry string) {
		for _, tt := range []struct {
			name      string
			replies   []reply
			noDaemon  bool
			wantReply *string
			wantError string // a substring; "" for none
			wantSent  int
			// racy: the send may fail (a plain hand-over: nothing was
			// sent) or the read (an error: the request may have arrived).
			racy bool
		}{
			{name: "failure reply", replies: []reply{{chunks: []string{`{"ok":false,"error":"params is missing","error_recorded":true}` + "\n"}}},
				wantReply: str(`{"ok":false,"error":"params is missing","error_recorded":true}`), wantSent: 1},
			{name: "ok false first", replies: []reply{{chunks: []string{`{"ok":truex}` + "\n"}}}, wantReply: str(`{"ok":truex}`), wantSent: 1},
			{name: "empty line", replies: []reply{{chunks: []string{"\n"}}}, wantReply: str(""), wantSent: 1},
			{name: "closed without answering", replies: []reply{{chunks: []string{`{"ok":tr`}}}, wantError: "closed the connection without answering", wantSent: 1},
			{name: "closed before reading", replies: []reply{{closeEarly: true}}, wantError: "the xenblkd daemon", racy: true},
			{name: "reply too large", replies: []reply{{chunks: []string{strings.Repeat("x", 70<<10)}}}, wantError: "larger than 64 KiB", wantSent: 1},
			{name: "no daemon", noDaemon: true},
		} {
			t.Run(tt.name, func(t *testing.T) {
				socket := filepath.Join(t.TempDir(), "none.sock")
				var f *fakeDaemon
				if !tt.noDaemon {
					f = startFake(t, tt.replies...)
					socket = f.socket
				}
				r := run(t, entry, []string{"add"}, "XENBUS_PATH="+be, "XENBLKD_SOCKET="+socket)
				if r.over == nil {
					t.Fatalf("exit %d, stderr %q; want a hand-over", r.code, r.stderr)
				}
				if got, want := strings.Join(r.over.Args, " "), "/etc/xen/scripts/xenblkd add"; got != want || r.over.Path != be {
					t.Errorf("handed over argv %q, XENBUS_PATH %q; want %q, %q", got, r.over.Path, want, be)
				}
				if tt.racy && r.over.Error == nil && r.over.Reply == nil {
					return
				}
				switch {
				case (tt.wantReply == nil) != (r.over.Reply == nil) || (tt.wantReply != nil && *tt.wantReply != *r.over.Reply):
					t.Errorf("XENBLKD_ENTRY_REPLY = %v; want %v", deref(r.over.Reply), deref(tt.wantReply))
				case (tt.wantError == "") != (r.over.Error == nil) || (r.over.Error != nil && !strings.Contains(*r.over.Error, tt.wantError)):
					t.Errorf("XENBLKD_ENTRY_ERROR = %v; want one containing %q", deref(r.over.Error), tt.wantError)
				}
				if f != nil && !tt.racy {
					if got := len(f.requests()); got != tt.wantSent {
						t.Errorf("%d requests sent; want %d", got, tt.wantSent)
					}
				}
			})
		}
	})
}

func deref(s *string) string {
	if s == nil {
		return "(unset)"
	}
	return strconv.Quote(*s)
}

// TestInvocation: argv and environment the entry does not handle itself are
// handed over unchanged, with nothing sent; XENBUS_PATH is accepted exactly
// when the Go entry's parser accepts it.
func TestInvocation(t *testing.T) {
	type invocation struct {
		args []string
		env  []string
	}
	long := filepath.Join("/run", strings.Repeat("s", 120), "api.sock")
	cases := map[string]invocation{
		"no action":            {nil, []string{"XENBUS_PATH=" + be}},
		"unknown action":       {[]string{"online"}, []string{"XENBUS_PATH=" + be}},
		"extra argument":       {[]string{"add", "x"}, []string{"XENBUS_PATH=" + be}},
		"help":                 {[]string{"--help"}, nil},
		"add --help":           {[]string{"add", "--help"}, nil},
		"XENBUS_PATH unset":    {[]string{"add"}, nil},
		"XENBUS_TYPE=vif":      {[]string{"add"}, []string{"XENBUS_PATH=" + be, "XENBUS_TYPE=vif"}},
		"socket path too long": {[]string{"add"}, []string{"XENBUS_PATH=" + be, "XENBLKD_SOCKET=" + long}},
	}
	for _, p := range []string{"", "backend/vbd/0/0", "backend/vbd/32751/4294967295", "backend/vbd/32752/1",
		"backend/vbd/1/4294967296", "backend/vbd/01/51712", "backend/vbd/1/051712", "backend/vbd/1/51712/",
		"/backend/vbd/1/51712", "backend/vif/1/0", "backend/vbd/1", "backend/vbd/-1/5", "backend/vbd/1/5x",
		"backend/vbd/ 1/5", "backend/vbd//5", "backend/vbd/1/", "backend/vbd/99999999999999999999999/1",
		"backend/vbd/1/+5", "backendXvbd/1/5", "backend/vbd/1/5\n"} {
		cases["XENBUS_PATH="+strconv.Quote(p)] = invocation{[]string{"add"}, []string{"XENBUS_PATH=" + p}}
	}
	cases["XENBUS_TYPE empty"] = invocation{[]string{"remove"}, []string{"XENBUS_PATH=" + be, "XENBUS_TYPE="}}
	each(t, func(t *testing.T, entry string) {
		for name, c := range cases {
			t.Run(name, func(t *testing.T) {
				f := startFake(t)
				env := append([]string{"XENBLKD_SOCKET=" + f.socket}, c.env...)
				r := run(t, entry, c.args, env...)
				sent := len(f.requests())
				wantSent := wantHandled(c.args, env)
				if wantSent {
					if r.code != 0 || sent != 1 {
						t.Fatalf("exit %d, %d requests, hand-over %+v; want 0 and one request", r.code, sent, r.over)
					}
					return
				}
				if r.over == nil || sent != 0 || r.over.Reply != nil || r.over.Error != nil {
					t.Fatalf("exit %d, %d requests, hand-over %+v; want a plain hand-over and nothing sent", r.code, sent, r.over)
				}
				if got, want := strings.Join(r.over.Args[1:], " "), strings.Join(c.args, " "); got != want {
					t.Errorf("handed over args %q; want %q", got, want)
				}
			})
		}
	})
}

// wantHandled is the reference: what the Go entry would send to the daemon.
func wantHandled(args, env []string) bool {
	vars := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		vars[k] = v
	}
	if len(args) != 1 || (args[0] != "add" && args[0] != "remove") {
		return false
	}
	if _, err := hotplug.ParseBackendPath(vars["XENBUS_PATH"]); err != nil {
		return false
	}
	if t := vars["XENBUS_TYPE"]; t != "" && t != "vbd" {
		return false
	}
	return len(vars["XENBLKD_SOCKET"]) < 108
}

// nobodyDaemon is a fake daemon running as uid 65534: it listens on the
// socket named by $SOCKET, prints "ready", and reports on stdout how many
// bytes each connection sent before it closed. It serves until killed: the
// C entry and then the Go entry it hands over to each connect, and a daemon
// that left after the first would make the second's failure a race.
func nobodyDaemon() int {
	if err := syscall.Setgid(65534); err != nil {
		fmt.Println("setgid:", err)
		return 1
	}
	if err := syscall.Setuid(65534); err != nil {
		fmt.Println("setuid:", err)
		return 1
	}
	l, err := net.Listen("unix", os.Getenv("SOCKET"))
	if err != nil {
		fmt.Println("listen:", err)
		return 1
	}
	fmt.Println("ready")
	for {
		c, err := l.Accept()
		if err != nil {
			return 1
		}
		c.Write([]byte(`{"ok":true}` + "\n"))
		var buf bytes.Buffer
		buf.ReadFrom(c)
		c.Close()
		fmt.Println("received", buf.Len())
	}
}

// TestPeerNotRoot: a socket served by another user gets no request; the Go
// entry (the real one here) refuses it too, with a message naming the uid.
func TestPeerNotRoot(t *testing.T) {
	testenv.RequireRoot(t, "runs a daemon as another user")
	dir := t.TempDir()
	goBinary, err := build.Xenblkd(dir)
	if err != nil {
		t.Fatal(err)
	}
	each(t, func(t *testing.T, entry string) {
		// A directory uid 65534 can bind in (t.TempDir's parents are 0700).
		sockDir, err := os.MkdirTemp("", "xenblkd-entry-nobody-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(sockDir) })
		os.Chmod(sockDir, 0o777)
		socket := filepath.Join(sockDir, "api.sock")
		self, _ := os.Executable()
		d := exec.Command(self)
		d.Env = []string{"XENBLKD_TEST_HELPER=nobody-daemon", "SOCKET=" + socket}
		out, _ := d.StdoutPipe()
		if err := d.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Process.Kill(); d.Wait() })
		lines := bufio.NewScanner(out)
		if !lines.Scan() || lines.Text() != "ready" {
			t.Fatalf("nobody daemon: %q", lines.Text())
		}
		r := run(t, entry, []string{"add"}, "XENBUS_PATH="+be, "XENBLKD_SOCKET="+socket, "XENBLKD_BIN="+goBinary,
			"XENSTORED_PATH="+filepath.Join(dir, "no-xenstored"))
		if r.code != 1 || !regexp.MustCompile(`uid 65534; the hotplug entry sends requests to a root daemon only`).MatchString(r.stderr) {
			t.Errorf("exit %d, stderr %q; want 1 and the refusal", r.code, r.stderr)
		}
		// Both entries connected (the C one, then the Go one it handed over
		// to) and closed: the daemon saw no bytes from either.
		for _, who := range []string{"the C entry", "the Go entry"} {
			if !lines.Scan() || lines.Text() != "received 0" {
				t.Errorf("nobody daemon, connection of %s: %q; want it received nothing", who, lines.Text())
			}
		}
	})
}

// TestDaemonDownHandsOverToGo: with no daemon the real Go entry waits for
// one (XENBLKD_CONNECT_TIMEOUT here) and then says so.
func TestDaemonDownHandsOverToGo(t *testing.T) {
	dir := t.TempDir()
	goBinary, err := build.Xenblkd(dir)
	if err != nil {
		t.Fatal(err)
	}
	each(t, func(t *testing.T, entry string) {
		r := run(t, entry, []string{"remove"}, "XENBUS_PATH="+be, "XENBLKD_SOCKET="+filepath.Join(dir, "none.sock"),
			"XENBLKD_BIN="+goBinary, "XENBLKD_CONNECT_TIMEOUT=200ms")
		if r.code != 1 || !strings.Contains(r.stderr, "xenblkd daemon is not running (no one listened on") || !strings.Contains(r.stderr, "for 200ms") {
			t.Errorf("exit %d, stderr %q; want 1 and the daemon named as not running", r.code, r.stderr)
		}
	})
}

// TestHandoverTargetMissing: if the Go binary cannot be run, the entry says
// so on stderr and fails.
func TestHandoverTargetMissing(t *testing.T) {
	each(t, func(t *testing.T, entry string) {
		r := run(t, entry, []string{"online"}, "XENBUS_PATH="+be, "XENBLKD_BIN=/nonexistent/xenblkd")
		if r.code != 1 || !strings.Contains(r.stderr, "cannot run /nonexistent/xenblkd to report an error: No such file or directory") {
			t.Errorf("exit %d, stderr %q; want 1 and the missing binary named", r.code, r.stderr)
		}
	})
}

// TestSyscalls counts the static entry's syscalls on the success path (the
// issue's bound is 25; make bench reports the same count).
func TestSyscalls(t *testing.T) {
	strace, err := exec.LookPath("strace")
	if err != nil {
		testenv.Skip(t, "no strace (scripts/setup.sh installs it)")
	}
	f := startFake(t)
	out := filepath.Join(t.TempDir(), "strace.txt")
	cmd := exec.Command(strace, "-f", "-c", "-o", out, builds["static"], "add")
	cmd.Env = []string{"XENBUS_PATH=" + be, "XENBLKD_SOCKET=" + f.socket}
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("strace: %v\n%s", err, b)
	}
	b, _ := os.ReadFile(out)
	m := regexp.MustCompile(`(?m)^100\.00(?:\s+\S+){2}\s+(\d+)\s+(?:\d+\s+)?total$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no total in strace -c output:\n%s", b)
	}
	n, _ := strconv.Atoi(string(m[1]))
	t.Logf("success path: %d syscalls", n)
	if n > 25 {
		t.Errorf("success path makes %d syscalls; the bound is 25:\n%s", n, b)
	}
}
