package daemon

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"xenblkd/internal/hotplug"
	"xenblkd/internal/xenstore"
	"xenblkd/test/xenstored"
)

// TestPresetupAfterXenstoredRestart: against the real C xenstored, an idle
// daemon (no request after the restart) redials by itself, re-registers its
// pre-setup watch, and attaches the first backend libxl writes after
// xenstored came back, before any script is exec'd.
func TestPresetupAfterXenstoredRestart(t *testing.T) {
	xsd := xenstored.Start(t, xenstored.C)
	ctx := context.Background()
	xs, err := xenstore.DialUnix(ctx, xsd.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { xs.Close() })
	ups := make(chan bool, 10)
	xs.OnConnection(func(up bool, err error) { ups <- up })
	host := newHost()
	d := New(discard, hotplug.ClientStore{Client: xs}, host)
	stop, err := d.StartPresetup(ctx, xs, PresetupOptions{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)

	img := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(img, []byte("image"), 0o644); err != nil {
		t.Fatal(err)
	}
	// libxl's side: its own connection, dialled after each restart.
	libxl := func() *xenstore.Client {
		c, err := xenstore.DialUnix(ctx, xsd.Socket)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	env := &preEnv{d: d, xs: libxl(), host: host}
	env.waitAttached(t, libxlBackend(t, env.xs, 1, 51712, ourScript, img, "r"))

	if err := xsd.Restart(); err != nil {
		t.Fatal(err)
	}
	select {
	case up := <-ups:
		if up {
			t.Fatal("first connection change after the restart is up, want down")
		}
	case <-time.After(time.Second):
		t.Fatal("the idle daemon did not notice the lost XenStore connection within 1 s")
	}
	waitFor(t, "the daemon's XenStore connection back", xs.Connected)
	restored := time.Now()
	env.xs = libxl()
	b := libxlBackend(t, env.xs, 2, 51712, ourScript, img, "r")
	env.waitAttached(t, b)
	t.Logf("first backend after the restart pre-set-up %v after the redial", time.Since(restored))
	if st, _ := env.node(t, b, "hotplug-status"); st != "connected" {
		t.Errorf("hotplug-status %q, want connected (pre-setup, no exec)", st)
	}
}
