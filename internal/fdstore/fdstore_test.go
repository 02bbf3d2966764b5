package fdstore

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// message is one datagram received by the fake service manager.
type message struct {
	state string
	fds   []int // owned by the test, closed in Cleanup
}

// fakeManager binds a unixgram socket at addr (a path or "@abstract" name),
// points $NOTIFY_SOCKET at it and returns a function reading the next
// datagram with its SCM_RIGHTS fds.
func fakeManager(t *testing.T, addr string) func() message {
	t.Helper()
	s, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(s) })
	if err := unix.Bind(s, &unix.SockaddrUnix{Name: addr}); err != nil {
		t.Fatalf("bind %s: %v", addr, err)
	}
	tv := unix.NsecToTimeval(int64(5 * time.Second))
	if err := unix.SetsockoptTimeval(s, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	t.Setenv("NOTIFY_SOCKET", addr)
	return func() message {
		t.Helper()
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(MaxFDsPerMessage*4))
		n, oobn, flags, _, err := unix.Recvmsg(s, buf, oob, unix.MSG_CMSG_CLOEXEC)
		if err != nil {
			t.Fatalf("recvmsg: %v", err)
		}
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			t.Fatalf("recvmsg: truncated (flags %#x)", flags)
		}
		m := message{state: string(buf[:n])}
		cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cmsgs {
			fds, err := unix.ParseUnixRights(&c)
			if err != nil {
				t.Fatal(err)
			}
			m.fds = append(m.fds, fds...)
		}
		t.Cleanup(func() {
			for _, fd := range m.fds {
				unix.Close(fd)
			}
		})
		return m
	}
}

// sameFile reports whether two fds refer to the same inode.
func sameFile(t *testing.T, a, b int) bool {
	t.Helper()
	var sa, sb unix.Stat_t
	if err := unix.Fstat(a, &sa); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fstat(b, &sb); err != nil {
		t.Fatal(err)
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

func tempFDs(t *testing.T, n int) []int {
	t.Helper()
	fds := make([]int, n)
	for i := range fds {
		fd, err := unix.Open(filepath.Join(t.TempDir(), "f"), unix.O_CREAT|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		fds[i] = fd
	}
	return fds
}

func TestNotify(t *testing.T) {
	for _, addr := range []string{"path", "@abstract"} {
		t.Run(addr, func(t *testing.T) {
			if addr == "path" {
				addr = filepath.Join(t.TempDir(), "notify")
			} else {
				addr = fmt.Sprintf("@xenblkd-test-fdstore-%d-%d", os.Getpid(), time.Now().UnixNano())
			}
			recv := fakeManager(t, addr)
			for _, state := range []string{"READY=1", "STATUS=adopted 3 devices", "STOPPING=1"} {
				if err := Notify(state); err != nil {
					t.Fatal(err)
				}
				if got := recv(); got.state != state || len(got.fds) != 0 {
					t.Errorf("got %q with %d fds, want %q with none", got.state, len(got.fds), state)
				}
			}
		})
	}
}

func TestStore(t *testing.T) {
	recv := fakeManager(t, "@"+fmt.Sprintf("xenblkd-test-fdstore-%d-%d", os.Getpid(), time.Now().UnixNano()))
	fds := tempFDs(t, 2)
	if err := Store("loop-7-42", fds...); err != nil {
		t.Fatal(err)
	}
	if got := recv(); got.state != "FDSTOREREMOVE=1\nFDNAME=loop-7-42" || len(got.fds) != 0 {
		t.Errorf("first message: got %q with %d fds, want the remove without fds", got.state, len(got.fds))
	}
	got := recv()
	if got.state != "FDSTORE=1\nFDNAME=loop-7-42" {
		t.Errorf("second message: got %q, want FDSTORE=1 with the name", got.state)
	}
	if len(got.fds) != len(fds) {
		t.Fatalf("got %d fds, want %d", len(got.fds), len(fds))
	}
	for i := range fds {
		if !sameFile(t, got.fds[i], fds[i]) {
			t.Errorf("fd %d arrived as a different file", i)
		}
	}

	if err := Remove("loop-7-42"); err != nil {
		t.Fatal(err)
	}
	if got := recv(); got.state != "FDSTOREREMOVE=1\nFDNAME=loop-7-42" || len(got.fds) != 0 {
		t.Errorf("remove: got %q with %d fds", got.state, len(got.fds))
	}
}

// TestStoreManyFDs checks that more fds than one message can carry are split.
func TestStoreManyFDs(t *testing.T) {
	recv := fakeManager(t, filepath.Join(t.TempDir(), "notify"))
	fds := tempFDs(t, 1)
	many := make([]int, MaxFDsPerMessage+10)
	for i := range many {
		many[i] = fds[0]
	}
	if err := Store("many", many...); err != nil {
		t.Fatal(err)
	}
	recv() // FDSTOREREMOVE
	var total int
	for _, want := range []int{MaxFDsPerMessage, 10} {
		got := recv()
		if got.state != "FDSTORE=1\nFDNAME=many" || len(got.fds) != want {
			t.Errorf("got %q with %d fds, want FDSTORE with %d", got.state, len(got.fds), want)
		}
		total += len(got.fds)
	}
	if total != len(many) {
		t.Errorf("got %d fds in total, want %d", total, len(many))
	}
}

func TestUnavailable(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	fds := tempFDs(t, 1)
	for _, err := range []error{Notify("READY=1"), Store("x", fds...), Remove("x")} {
		if err != nil {
			t.Errorf("got %v, want a no-op without systemd", err)
		}
	}
	// Invalid input is still an error: it is a bug in the caller either way.
	if err := Store("a:b", fds...); !errors.Is(err, ErrInvalidName) {
		t.Errorf("Store(a:b) = %v, want ErrInvalidName", err)
	}
}

func TestSendError(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "nobody-listens"))
	if err := Notify("READY=1"); !errors.Is(err, unix.ENOENT) {
		t.Errorf("got %v, want ENOENT", err)
	}
	t.Setenv("NOTIFY_SOCKET", "relative")
	if err := Notify("READY=1"); err == nil {
		t.Error("relative NOTIFY_SOCKET accepted")
	}
}

func TestValidName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"loop-0-1", true},
		{"stored", true},
		{strings.Repeat("a", 255), true},
		{"with space~", true},
		{"", false},
		{strings.Repeat("a", 256), false},
		{"a:b", false},
		{"tab\there", false},
		{"new\nline", false},
		{"del\x7f", false},
		{"ü", false},
	}
	for _, tt := range tests {
		err := ValidName(tt.name)
		if (err == nil) != tt.ok {
			t.Errorf("ValidName(%q) = %v, want ok=%v", tt.name, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidName) {
			t.Errorf("ValidName(%q) = %v, not ErrInvalidName", tt.name, err)
		}
		if err := Store(tt.name, 0); tt.ok == false && !errors.Is(err, ErrInvalidName) {
			t.Errorf("Store(%q) = %v, want ErrInvalidName", tt.name, err)
		}
	}
}

func TestListenEnv(t *testing.T) {
	tests := []struct {
		desc string
		env  map[string]string
		want []File // fds start at 3; nil means none
		err  bool
	}{
		{"unset", nil, nil, false},
		{"other pid", map[string]string{"LISTEN_PID": "1", "LISTEN_FDS": "1"}, nil, false},
		{"zero", map[string]string{"LISTEN_PID": "100", "LISTEN_FDS": "0"}, nil, false},
		{"bad pid", map[string]string{"LISTEN_PID": "x", "LISTEN_FDS": "1"}, nil, true},
		{"bad count", map[string]string{"LISTEN_PID": "100", "LISTEN_FDS": "-1"}, nil, true},
	}
	for _, tt := range tests {
		got, err := listen(func(k string) string { return tt.env[k] }, 100)
		if (err != nil) != tt.err || len(got) != len(tt.want) {
			t.Errorf("%s: got %v, %v; want %v, err=%v", tt.desc, got, err, tt.want, tt.err)
		}
	}
}

// TestListen passes real fds at 3.. to a child (this test binary again) with
// the environment systemd would set, and checks what Listen returns there.
func TestListen(t *testing.T) {
	if os.Getenv("XENBLKD_TEST_LISTEN_CHILD") == "1" {
		listenChild()
		return
	}
	tests := []struct {
		desc, names string
		want        []string
	}{
		{"named", "loop-1-5:loop-2-6:loop-2-6", []string{"loop-1-5", "loop-2-6", "loop-2-6"}},
		{"count mismatch", "a:b", []string{"unknown", "unknown", "unknown"}},
		{"no names", "", []string{"unknown", "unknown", "unknown"}},
	}
	for _, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			dir := t.TempDir()
			var files []*os.File
			for i := range 3 {
				f, err := os.Create(filepath.Join(dir, strconv.Itoa(i)))
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				files = append(files, f)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^TestListen$", "-test.count=1")
			cmd.ExtraFiles = files // fds 3, 4, 5 in the child
			cmd.Env = append(os.Environ(), "XENBLKD_TEST_LISTEN_CHILD=1",
				"LISTEN_FDS=3", "LISTEN_FDNAMES="+tt.names, "LISTEN_PIDFDID=1")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("child: %v\n%s", err, out)
			}
			var want strings.Builder
			for i, name := range tt.want {
				fmt.Fprintf(&want, "%d %s %s cloexec=true\n", 3+i, name, filepath.Join(dir, strconv.Itoa(i)))
			}
			want.WriteString("env=\n")
			if got := childResult(string(out)); got != want.String() {
				t.Errorf("got\n%s\nwant\n%s", got, want.String())
			}
		})
	}
}

const resultMarker = "LISTEN-RESULT\n"

func childResult(out string) string {
	_, after, _ := strings.Cut(out, resultMarker)
	before, _, _ := strings.Cut(after, "LISTEN-END")
	return before
}

// listenChild runs in the child of TestListen. LISTEN_PID can only be set
// here: the parent does not know the child's pid before it starts.
func listenChild() {
	os.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
	files, err := Listen()
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	var b strings.Builder
	b.WriteString(resultMarker)
	for _, f := range files {
		path, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd))
		flags, _ := unix.FcntlInt(uintptr(f.Fd), unix.F_GETFD, 0)
		fmt.Fprintf(&b, "%d %s %s cloexec=%v\n", f.Fd, f.Name, path, flags&unix.FD_CLOEXEC != 0)
	}
	fmt.Fprintf(&b, "env=%s%s%s%s\n", os.Getenv("LISTEN_PID"), os.Getenv("LISTEN_FDS"),
		os.Getenv("LISTEN_FDNAMES"), os.Getenv("LISTEN_PIDFDID"))
	b.WriteString("LISTEN-END\n")
	fmt.Print(b.String())
}

// TestTake: socket activation's socket and the fd store's loop devices come
// in one LISTEN_FDS; Take tells them apart by name, keeping their order.
func TestTake(t *testing.T) {
	files := []File{{3, "api"}, {4, "loop-7-100"}, {5, "unknown"}, {6, "loop-8-101"}, {7, "api"}}
	named, rest := Take(files, "api")
	if want := []File{{3, "api"}, {7, "api"}}; !reflect.DeepEqual(named, want) {
		t.Errorf("named = %v, want %v", named, want)
	}
	if want := []File{{4, "loop-7-100"}, {5, "unknown"}, {6, "loop-8-101"}}; !reflect.DeepEqual(rest, want) {
		t.Errorf("rest = %v, want %v", rest, want)
	}
	if named, rest := Take(nil, "api"); named != nil || rest != nil {
		t.Errorf("Take(nil) = %v, %v; want nil, nil", named, rest)
	}
}
