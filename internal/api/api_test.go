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
