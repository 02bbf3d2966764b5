package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/testenv"
	"xenblkd/internal/unixsock"
)

// TestListenRefusesUnsafeDirectory: the API socket is not served from a
// directory that users other than root can write (they could replace the
// socket), nor below one that is not sticky; a sticky /tmp-like parent and
// a missing directory (created 0700) are fine.
func TestListenRefusesUnsafeDirectory(t *testing.T) {
	testenv.RequireRoot(t, "the check trusts only root-owned directories")
	tests := []struct {
		name    string
		mode    os.FileMode // of the socket's directory
		parent  os.FileMode // of its parent
		owner   int         // of the socket's directory
		wantErr string
	}{
		{"root only", 0o700, 0o755, 0, ""},
		{"world-readable", 0o755, 0o755, 0, ""},
		{"world-writable", 0o777, 0o755, 0, "writable by non-root users (mode 0777)"},
		{"group-writable", 0o770, 0o755, 0, "writable by non-root users (mode 0770)"},
		{"sticky world-writable leaf", 0o1777, 0o755, 0, "writable by non-root users"},
		{"under a sticky dir", 0o700, 0o1777, 0, ""},
		{"under a world-writable dir", 0o700, 0o777, 0, "writable by non-root users"},
		{"owned by a user", 0o700, 0o755, 1000, "owned by uid 1000, not root"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			parent := filepath.Join(t.TempDir(), "parent")
			dir := filepath.Join(parent, "xenblkd")
			if err := os.MkdirAll(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			for _, c := range []struct {
				path string
				mode os.FileMode
			}{{dir, tt.mode}, {parent, tt.parent}} {
				if err := os.Chmod(c.path, c.mode&0o777|sticky(c.mode)); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.Chown(dir, tt.owner, 0); err != nil {
				t.Fatal(err)
			}
			// A socket systemd passed (xenblkd.socket) gets the same check.
			passed := listenPassed(t, filepath.Join(dir, "passed.sock"))
			pl, perr := ListenFD(passed)
			if pl != nil {
				pl.Close()
			}
			if (tt.wantErr == "") != (perr == nil) || perr != nil && (!errors.Is(perr, unixsock.ErrUnsafeDir) || !strings.Contains(perr.Error(), tt.wantErr)) {
				t.Errorf("ListenFD: %v; want unixsock.ErrUnsafeDir %q", perr, tt.wantErr)
			}
			l, err := Listen(filepath.Join(dir, "api.sock"))
			if l != nil {
				l.Close()
			}
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Listen: %v", err)
				}
				return
			}
			if !errors.Is(err, unixsock.ErrUnsafeDir) || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Listen: %v; want unixsock.ErrUnsafeDir, %q", err, tt.wantErr)
			}
			if _, err := os.Lstat(filepath.Join(dir, "api.sock")); err == nil {
				t.Error("socket created in an unsafe directory")
			}
		})
	}
	// A missing directory is made root-only.
	dir := filepath.Join(t.TempDir(), "new")
	l, err := Listen(filepath.Join(dir, "api.sock"))
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("made %s with %v, %v; want 0700", dir, fi.Mode(), err)
	}
}

func sticky(m os.FileMode) os.FileMode {
	if m&0o1000 != 0 {
		return os.ModeSticky
	}
	return 0
}

// listenPassed returns the fd of a listening socket at path, as systemd
// passes one (the test's listener keeps the path until the test ends).
func listenPassed(t *testing.T, path string) int {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	f, err := l.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd, err := unix.Dup(int(f.Fd())) // ListenFD takes this one over
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

// TestRequestLimit: a request up to api.MaxRequest is read; a longer one is
// answered with an error naming the limit (not dropped without a word).
func TestRequestLimit(t *testing.T) {
	socket := serveTest(t, pingHandler{})
	call := func(line string) api.Response {
		t.Helper()
		c, err := net.Dial("unix", socket)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte(line)); err != nil {
			t.Fatal(err)
		}
		var resp api.Response
		if err := json.NewDecoder(c).Decode(&resp); err != nil {
			t.Fatalf("reply to a %d-byte request: %v", len(line), err)
		}
		return resp
	}
	pad := func(n int) string { // a ping request of exactly n bytes, newline included
		const head, tail = `{"op":"ping","path":"`, "\"}\n"
		return head + strings.Repeat("x", n-len(head)-len(tail)) + tail
	}
	if resp := call(pad(api.MaxRequest)); !resp.OK {
		t.Errorf("a %d-byte request: %+v, want ok", api.MaxRequest, resp)
	}
	want := fmt.Sprintf("longer than %d bytes", api.MaxRequest)
	if resp := call(pad(api.MaxRequest + 1)); resp.OK || !strings.Contains(resp.Error, want) {
		t.Errorf("a %d-byte request: %+v, want an error containing %q", api.MaxRequest+1, resp, want)
	}
}

// pingHandler answers ping, and nothing else.
type pingHandler struct{}

func (pingHandler) Handle(_ context.Context, req api.Request) api.Response {
	if req.Op == api.OpPing {
		return api.Response{OK: true}
	}
	return api.Response{Error: "only ping"}
}

// serveTest serves h on a socket of its own until the test ends.
func serveTest(t *testing.T, h Handler) (socket string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "xenblkd-server-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	socket = filepath.Join(dir, "api.sock")
	l, err := Listen(socket)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, l, h, slog.New(slog.DiscardHandler)) }()
	t.Cleanup(func() { cancel(); <-done })
	return socket
}
