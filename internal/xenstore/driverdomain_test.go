package xenstore

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"xenblkd/internal/xenstore/xenstoretest"
)

// TestDialDriverDomain checks Dial's choice of transport as a driver domain
// and dom0 see it, with fake paths: in a driver domain no xenstored socket
// exists, so Dial opens the xenbus device; XENSTORED_PATH always wins.
func TestDialDriverDomain(t *testing.T) {
	dir := t.TempDir()
	s := xenstoretest.NewServer(t, xenstoretest.Options{})
	xenbus := filepath.Join(dir, "xenbus") // stands in for /dev/xen/xenbus: opened as a file
	if err := os.WriteFile(xenbus, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	oldSockets, oldXenbus := defaultSockets, defaultXenbus
	t.Cleanup(func() { defaultSockets, defaultXenbus = oldSockets, oldXenbus })
	noSockets := []string{filepath.Join(dir, "run/xenstored/socket"), filepath.Join(dir, "var/run/xenstored/socket")}

	for _, tc := range []struct {
		name       string
		env        *string // nil: XENSTORED_PATH unset
		sockets    []string
		xenbus     string
		wantTarget string // "" : Dial fails
		wantErr    string
	}{
		{name: "driver domain: no socket, xenbus device", sockets: noSockets, xenbus: xenbus, wantTarget: xenbus},
		{name: "dom0: socket first", sockets: []string{s.Socket}, xenbus: xenbus, wantTarget: s.Socket},
		{name: "XENSTORED_PATH socket wins over xenbus", env: &s.Socket, sockets: noSockets, xenbus: xenbus, wantTarget: s.Socket},
		{name: "XENSTORED_PATH device file", env: &xenbus, sockets: []string{s.Socket}, xenbus: "/nonexistent", wantTarget: xenbus},
		{name: "nothing there", sockets: noSockets, xenbus: filepath.Join(dir, "none"), wantErr: "is xenstored running"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defaultSockets, defaultXenbus = tc.sockets, tc.xenbus
			t.Setenv("XENSTORED_PATH", "")
			if tc.env != nil {
				t.Setenv("XENSTORED_PATH", *tc.env)
			} else {
				os.Unsetenv("XENSTORED_PATH") // t.Setenv restores it
			}
			c, err := Dial(context.Background())
			if tc.wantTarget == "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Dial: %v, want an error with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer c.Close()
			if c.Target() != tc.wantTarget {
				t.Errorf("Dial chose %s, want %s", c.Target(), tc.wantTarget)
			}
		})
	}
}
