package xenstore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/xenstore/xenstoretest"
)

func encode(f frame) []byte {
	b := make([]byte, headerSize, headerSize+len(f.payload))
	putHeader(b, f.typ, f.reqID, f.txID, uint32(len(f.payload)))
	return append(b, f.payload...)
}

func TestFrameReader(t *testing.T) {
	good := []frame{
		{typ: typeRead, reqID: 1, payload: []byte("value")},
		{typ: typeWatchEvent, payload: []byte("/a\x00tok\x00")},
		{typ: typeError, reqID: 0xffffffff, txID: 7, payload: []byte("ENOENT\x00")},
		{typ: typeWrite, reqID: 2, payload: []byte{}},
		{typ: typeRead, reqID: 3, payload: bytes.Repeat([]byte("x"), MaxPayload)},
	}
	var stream []byte
	for _, f := range good {
		stream = append(stream, encode(f)...)
	}
	r := newFrameReader(bytes.NewReader(stream))
	for i, want := range good {
		got, err := r.next()
		if err != nil || got.typ != want.typ || got.reqID != want.reqID || got.txID != want.txID || !bytes.Equal(got.payload, want.payload) {
			t.Fatalf("frame %d = %+v, %v; want %+v", i, got, err, want)
		}
	}
	if _, err := r.next(); err != io.EOF {
		t.Errorf("after the last frame: got %v, want io.EOF", err)
	}

	bad := []struct {
		name  string
		input []byte
		want  error
	}{
		{"short header", []byte{1, 0, 0}, io.ErrUnexpectedEOF},
		{"short payload", encode(frame{typ: typeRead, payload: []byte("abc")})[:headerSize+1], io.ErrUnexpectedEOF},
		{"header only", encode(frame{typ: typeRead, payload: []byte("abc")})[:headerSize], io.ErrUnexpectedEOF},
		{"too large", func() []byte {
			b := make([]byte, headerSize)
			putHeader(b, typeRead, 1, 0, maxReplyPayload+1)
			return b
		}(), errFrameTooLarge},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := newFrameReader(bytes.NewReader(tc.input)).next(); !errors.Is(err, tc.want) {
				t.Errorf("got %v, want %v", err, tc.want)
			}
		})
	}
}

func TestParseError(t *testing.T) {
	tests := []struct {
		payload string
		want    error
	}{
		{"ENOENT\x00", unix.ENOENT},
		{"EACCES\x00", unix.EACCES},
		{"EAGAIN\x00", unix.EAGAIN},
		{"EINVAL\x00", unix.EINVAL},
		{"E2BIG\x00", unix.E2BIG},
		{"EQUOTA\x00", unix.EDQUOT},
		{"EEXIST", unix.EEXIST}, // no NUL: tolerated
		{"EWHATEVER\x00", unix.EIO},
	}
	for _, tc := range tests {
		if got := parseError([]byte(tc.payload)); !errors.Is(got, tc.want) {
			t.Errorf("parseError(%q) = %v, want %v", tc.payload, got, tc.want)
		}
	}
	err := &Error{Op: "read", Path: "/a", Err: parseError([]byte("ENOENT\x00"))}
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%v does not match fs.ErrNotExist", err)
	}
	if got, want := err.Error(), "xenstore read /a: no such file or directory"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestParseReplies(t *testing.T) {
	dirs := []struct {
		payload string
		want    []string
	}{
		{"", []string{}},
		{"\x00", []string{}},
		{"a\x00", []string{"a"}},
		{"a\x00bc\x00d\x00", []string{"a", "bc", "d"}},
		{"a\x00b", []string{"a", "b"}},
	}
	for _, tc := range dirs {
		if got := parseDirectory([]byte(tc.payload)); !slices.Equal(got, tc.want) {
			t.Errorf("parseDirectory(%q) = %q, want %q", tc.payload, got, tc.want)
		}
	}

	perms := []struct {
		payload string
		want    []Perm
		ok      bool
	}{
		{"n0\x00", []Perm{{0, 'n'}}, true},
		{"b0\x00r5\x00w4294967295\x00", []Perm{{0, 'b'}, {5, 'r'}, {4294967295, 'w'}}, true},
		{"", nil, false},
		{"x0\x00", nil, false},
		{"n\x00", nil, false},
		{"r-1\x00", nil, false},
		{"r4294967296\x00", nil, false},
	}
	for _, tc := range perms {
		got, err := parsePerms([]byte(tc.payload))
		if (err == nil) != tc.ok || !slices.Equal(got, tc.want) {
			t.Errorf("parsePerms(%q) = %v, %v; want %v (ok %v)", tc.payload, got, err, tc.want, tc.ok)
		}
	}

	txs := []struct {
		payload string
		want    uint32
		ok      bool
	}{
		{"1\x00", 1, true},
		{"4294967295\x00", 4294967295, true},
		{"0\x00", 0, false},
		{"x\x00", 0, false},
		{"", 0, false},
	}
	for _, tc := range txs {
		got, err := parseTxID([]byte(tc.payload))
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseTxID(%q) = %d, %v; want %d (ok %v)", tc.payload, got, err, tc.want, tc.ok)
		}
	}

	events := []struct {
		payload, path, token string
		ok                   bool
	}{
		{"/a/b\x00tok\x00", "/a/b", "tok", true},
		{"rel\x00t", "rel", "t", true},
		{"nonul", "", "", false},
	}
	for _, tc := range events {
		p, tok, err := parseWatchEvent([]byte(tc.payload))
		if (err == nil) != tc.ok || p != tc.path || tok != tc.token {
			t.Errorf("parseWatchEvent(%q) = %q, %q, %v", tc.payload, p, tok, err)
		}
	}
}

// FuzzFrameReader: decoding never panics, never returns an oversized
// payload, and the frames decoded re-encode to exactly the bytes consumed.
func FuzzFrameReader(f *testing.F) {
	f.Add(encode(frame{typ: typeRead, reqID: 1, payload: []byte("v")}))
	f.Add(append(encode(frame{typ: typeWatchEvent, payload: []byte("/a\x00t\x00")}), encode(frame{typ: typeWrite, reqID: 9, payload: []byte("OK\x00")})...))
	f.Fuzz(func(t *testing.T, input []byte) {
		r := newFrameReader(bytes.NewReader(input))
		var out []byte
		for {
			fr, err := r.next()
			if err != nil {
				break
			}
			if len(fr.payload) > maxReplyPayload {
				t.Fatalf("payload of %d bytes", len(fr.payload))
			}
			out = append(out, encode(fr)...)
		}
		if !bytes.HasPrefix(input, out) {
			t.Fatalf("re-encoded frames are not a prefix of the input")
		}
	})
}

// FuzzParseReply: the reply parsers never panic, and what they accept
// survives a format/parse round trip.
func FuzzParseReply(f *testing.F) {
	for _, s := range []string{"", "\x00", "OK\x00", "ENOENT\x00", "n0\x00r5\x00", "a\x00b\x00", "17\x00", "/p\x00tok\x00"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		if parseError(p) == nil {
			t.Fatal("parseError returned nil")
		}
		names := parseDirectory(p)
		if got := strings.Join(names, "\x00"); got != string(bytes.TrimSuffix(p, []byte{0})) {
			t.Fatalf("directory %q: names %q do not join back", p, names)
		}
		if perms, err := parsePerms(p); err == nil {
			var b []byte
			for _, pm := range perms {
				b = append(append(b, formatPerm(pm)...), 0)
			}
			again, err := parsePerms(b)
			if err != nil || !slices.Equal(again, perms) {
				t.Fatalf("perms %q -> %v -> %q -> %v, %v", p, perms, b, again, err)
			}
		}
		if id, err := parseTxID(p); err == nil && id == 0 {
			t.Fatalf("transaction id 0 accepted from %q", p)
		}
		if path, tok, err := parseWatchEvent(p); err == nil && (strings.Contains(path, "\x00") || strings.Contains(tok, "\x00")) {
			t.Fatalf("watch event %q: NUL in %q / %q", p, path, tok)
		}
	})
}

func TestChooseTransports(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	file := filepath.Join(dir, "xenbus")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	defaults := []string{"/d/1", "/d/2"}
	tests := []struct {
		name   string
		env    string
		envSet bool
		want   []transport
	}{
		{"unset", "", false, []transport{{"/d/1", true}, {"/d/2", true}, {"/dev/xb", false}}},
		{"empty counts as unset", "", true, []transport{{"/d/1", true}, {"/d/2", true}, {"/dev/xb", false}}},
		{"socket", sock, true, []transport{{sock, true}}},
		{"device file", file, true, []transport{{file, false}}},
		{"missing path is a socket, no fallback", filepath.Join(dir, "none"), true, []transport{{filepath.Join(dir, "none"), true}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := chooseTransports(tc.env, tc.envSet, defaults, "/dev/xb"); !slices.Equal(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestDialFallback(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := xenstoretest.NewServer(t, xenstoretest.Options{})

	// A stale socket (xenstored died without unlinking it) refuses: skipped.
	stale := filepath.Join(dir, "stale")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close()

	c, err := dialTransports(ctx, []transport{{filepath.Join(dir, "missing"), true}, {stale, true}, {s.Socket, true}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.target != s.Socket {
		t.Errorf("connected to %s, want %s", c.target, s.Socket)
	}

	_, err = dialTransports(ctx, []transport{{filepath.Join(dir, "missing"), true}, {filepath.Join(dir, "xenbus"), false}})
	if !errors.Is(err, unix.ENOENT) || !strings.Contains(err.Error(), "is xenstored running") {
		t.Errorf("no transport: got %v, want ENOENT and a hint", err)
	}
	if _, err := OpenXenbus(ctx, filepath.Join(dir, "xenbus")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("OpenXenbus of a missing device: got %v, want ErrNotExist", err)
	}
}

// TestBlockingTransport runs the client over a blocking fd, as a xenbus
// device that the runtime poller cannot watch would be: it works, and Close
// does not hang although the reader sits in read(2).
func TestBlockingTransport(t *testing.T) {
	s := xenstoretest.NewServer(t, xenstoretest.Options{EventsBeforeReply: true})
	open := func() (*os.File, error) {
		nc, err := net.Dial("unix", s.Socket)
		if err != nil {
			return nil, err
		}
		defer nc.Close()
		f, err := nc.(*net.UnixConn).File() // a dup in blocking mode
		if err != nil {
			return nil, err
		}
		return f, nil // os.NewFile of a blocking fd: not in the poller
	}
	c := newClient("blocking", open)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	w, err := c.Watch(ctx, "/x", "t")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Write(ctx, "/x", "1"); err != nil {
		t.Fatal(err)
	}
	for _, want := range []Event{{"/x", "t"}, {"/x", "t"}} {
		if got := <-w.Events(); got != want {
			t.Errorf("event %v, want %v", got, want)
		}
	}
	if got, err := c.Read(ctx, "/x"); err != nil || got != "1" {
		t.Errorf("Read = %q, %v", got, err)
	}
	s.Freeze()
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(ctx, "/x")
		done <- err
	}()
	for PendingRequests(c) != 1 {
		time.Sleep(time.Millisecond)
	}
	c.Close()
	if err := <-done; !errors.Is(err, ErrClosed) {
		t.Errorf("in-flight Read at Close: got %v, want ErrClosed", err)
	}
}
