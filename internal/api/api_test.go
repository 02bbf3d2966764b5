package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
)

func TestCall(t *testing.T) {
	dir, err := os.MkdirTemp("", "xb-api-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			var req Request
			line, _ := bufio.NewReader(c).ReadBytes('\n')
			json.Unmarshal(line, &req)
			resp := Response{OK: req.Op == OpAdd, Error: "refused " + req.Path}
			b, _ := json.Marshal(resp)
			c.Write(append(b, '\n'))
			c.Close()
		}
	}()
	tests := []struct {
		req  Request
		want Response
	}{
		{Request{Op: OpAdd, Path: "backend/vbd/1/2"}, Response{OK: true, Error: "refused backend/vbd/1/2"}},
		{Request{Op: OpRemove, Path: "x"}, Response{Error: "refused x"}},
	}
	for _, tt := range tests {
		got, err := Call(context.Background(), sock, tt.req)
		if err != nil || got.OK != tt.want.OK || got.Error != tt.want.Error {
			t.Errorf("Call(%+v) = %+v, %v; want %+v", tt.req, got, err, tt.want)
		}
	}
	if _, err := Call(context.Background(), filepath.Join(dir, "none.sock"), Request{Op: OpStatus}); !errors.Is(err, ErrDaemonUnreachable) {
		t.Errorf("Call to a missing socket: %v, want ErrDaemonUnreachable", err)
	}
}

func TestAppendRequestMatchesJSON(t *testing.T) {
	for _, req := range []Request{
		{Op: OpAdd, Path: "backend/vbd/1/51712"}, {Op: OpStatus}, {Op: OpRemove, Path: "a\"b"}, {Op: "x<y", Path: "é"}, {Op: "t\tab"},
	} {
		want, _ := json.Marshal(req)
		if got, ok := appendRequest(nil, req); ok && string(got) != string(want) {
			t.Errorf("appendRequest(%+v) = %s, want %s", req, got, want)
		}
	}
}

func TestCallBrief(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	replies := map[string]string{ // by path
		"ok":       `{"ok":true,"attachment":{"domid":1,"devid":2,"target":"/i","kind":"file","mode":"w","device":"/dev/loop0","physical_device":"7:0","users":1}}`,
		"bare":     `{"ok":true}`,
		"fail":     `{"ok":false,"error":"refused \"x\"\n","error_recorded":true}`,
		"reorder":  `{"error":"","ok":true}`,
		"garbage":  `{"ok":tru`,
		"fail-raw": `{"error":"no"}`,
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			var req Request
			line, _ := bufio.NewReader(c).ReadBytes('\n')
			json.Unmarshal(line, &req)
			c.Write([]byte(replies[req.Path] + "\n"))
			c.Close()
		}
	}()
	tests := []struct {
		path    string
		want    Response
		wantErr bool
	}{
		{"ok", Response{OK: true}, false},
		{"bare", Response{OK: true}, false},
		{"fail", Response{Error: "refused \"x\"\n", ErrorRecorded: true}, false},
		{"reorder", Response{OK: true}, false},
		{"garbage", Response{}, true},
		{"fail-raw", Response{Error: "no"}, false},
	}
	for _, tt := range tests {
		got, err := CallBrief(context.Background(), sock, Request{Op: OpAdd, Path: tt.path})
		if (err != nil) != tt.wantErr || got.OK != tt.want.OK || got.Error != tt.want.Error || got.ErrorRecorded != tt.want.ErrorRecorded {
			t.Errorf("CallBrief(%s) = %+v, %v; want %+v (error: %v)", tt.path, got, err, tt.want, tt.wantErr)
		}
	}
	if _, err := CallBrief(context.Background(), filepath.Join(dir, "none.sock"), Request{Op: OpAdd}); !errors.Is(err, ErrDaemonUnreachable) {
		t.Errorf("CallBrief to a missing socket: %v, want ErrDaemonUnreachable", err)
	}
}
