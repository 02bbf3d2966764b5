package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
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

func TestCallHotplug(t *testing.T) {
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
		{"ok", Response{OK: true, Attachment: &Attachment{Domid: 1, Devid: 2, Target: "/i", Kind: "file", Mode: "w", Device: "/dev/loop0", PhysicalDevice: "7:0", Users: 1}}, false},
		{"bare", Response{OK: true}, false},
		{"fail", Response{Error: "refused \"x\"\n", ErrorRecorded: true}, false},
		{"reorder", Response{OK: true}, false},
		{"garbage", Response{}, true},
		{"fail-raw", Response{Error: "no"}, false},
	}
	for _, tt := range tests {
		got, err := CallHotplug(context.Background(), sock, Request{Op: OpAdd, Path: tt.path}, HotplugOptions{})
		if (err != nil) != tt.wantErr || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("CallHotplug(%s) = %+v, %v; want %+v (error: %v)", tt.path, got, err, tt.want, tt.wantErr)
		}
	}
	missing := filepath.Join(dir, "none.sock")
	if _, err := CallHotplug(context.Background(), missing, Request{Op: OpAdd}, HotplugOptions{}); !errors.Is(err, ErrDaemonUnreachable) {
		t.Errorf("CallHotplug to a missing socket: %v, want ErrDaemonUnreachable", err)
	}
	start := time.Now()
	_, err = CallHotplug(context.Background(), missing, Request{Op: OpAdd}, HotplugOptions{ConnectWait: 300 * time.Millisecond})
	if !errors.Is(err, ErrDaemonUnreachable) || !strings.Contains(err.Error(), "for 300ms") || time.Since(start) < 300*time.Millisecond {
		t.Errorf("CallHotplug with ConnectWait to a missing socket: %v after %v; want ErrDaemonUnreachable after 300ms", err, time.Since(start))
	}
}

// TestCallHotplugWaitsForDaemon: a daemon that starts listening while the
// entry retries gets the request.
func TestCallHotplugWaitsForDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "late.sock")
	served := make(chan struct{})
	t.Cleanup(func() { <-served })
	go func() {
		defer close(served)
		time.Sleep(250 * time.Millisecond)
		l, err := net.Listen("unix", sock)
		if err != nil {
			return
		}
		defer l.Close()
		c, err := l.Accept()
		if err != nil {
			return
		}
		bufio.NewReader(c).ReadBytes('\n')
		c.Write([]byte(`{"ok":true}` + "\n"))
		c.Close()
	}()
	got, err := CallHotplug(context.Background(), sock, Request{Op: OpAdd, Path: "backend/vbd/1/2"}, HotplugOptions{ConnectWait: 5 * time.Second})
	if err != nil || !got.OK {
		t.Fatalf("CallHotplug to a daemon starting late: %+v, %v; want OK", got, err)
	}
}
