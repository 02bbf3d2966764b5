package daemon

import (
	"bytes"
	"context"
	"log/slog"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/lifecycle"
	"xenblkd/internal/xenstore/xenstoretest"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) lines() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Split(strings.TrimSpace(s.b.String()), "\n")
}

// TestDecisionLines: with pre-setup on, an attach, a release and a refusal
// each give exactly one line at info or above (the refusal once, at warning,
// by the exec'd add that decided it again after pre-setup met it), naming domain,
// domid, devid, vdev, target, dev and diskseq in that order.
func TestDecisionLines(t *testing.T) {
	ctx := context.Background()
	xs := dialTestStore(t, xenstoretest.Options{EventsBeforeReply: true})
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey || a.Key == "took" {
				return slog.Attr{}
			}
			return a
		},
	}))
	host := newHost()
	d := New(log, hotplug.ClientStore{Client: xs}, host)
	stop, err := d.StartPresetup(ctx, xs, PresetupOptions{Workers: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	if err := xs.Write(ctx, "/local/domain/3/name", "web"); err != nil {
		t.Fatal(err)
	}
	img := testImage(t)
	e := &preEnv{d: d, xs: xs, host: host}

	b := libxlBackend(t, xs, 3, 51712, ourScript, img, "w")
	e.waitAttached(t, b)
	waitFor(t, "pre-setup state", func() bool { return d.backends.Get(keyOf(b)).Phase == lifecycle.PresetUp })
	if resp := e.exec(t, api.OpAdd, b); !resp.OK {
		t.Fatalf("add: %+v", resp)
	}
	if resp := e.exec(t, api.OpRemove, b); !resp.OK {
		t.Fatalf("remove: %+v", resp)
	}
	missing := filepath.Join(t.TempDir(), "missing.img")
	bad := libxlBackend(t, xs, 3, 51728, ourScript, missing, "w")
	waitFor(t, "pre-setup's refusal", func() bool { return d.backends.Get(keyOf(bad)).Phase == lifecycle.Refused })
	if resp := e.exec(t, api.OpAdd, bad); resp.OK {
		t.Fatalf("add of a missing image succeeded: %+v", resp)
	}

	var decisions []string
	for _, l := range logs.lines() {
		if !strings.HasPrefix(l, "level=DEBUG") && !strings.Contains(l, `msg="pre-setup: watching backends"`) &&
			!strings.Contains(l, `msg="pre-setup: rescanned backends"`) {
			decisions = append(decisions, l)
		}
	}
	want := []*regexp.Regexp{
		regexp.MustCompile(`^level=INFO msg=attached domain=web domid=3 devid=51712 vdev=xvda target=` + regexp.QuoteMeta(img) + ` dev=/dev/loop1001 diskseq=\d+ mode=w kind=file io=\S+ users=1 by=presetup$`),
		regexp.MustCompile(`^level=INFO msg=released domain=web domid=3 devid=51712 vdev=xvda target=` + regexp.QuoteMeta(img) + ` dev=/dev/loop1001 diskseq=\d+ users_left=0$`),
		regexp.MustCompile(`^level=WARN msg=refused domain=web domid=3 devid=51728 vdev=xvda target=` + regexp.QuoteMeta(missing) + ` dev="" diskseq=0 reason=not_found by=script err=.*no such file`),
	}
	if len(decisions) != len(want) {
		t.Fatalf("%d lines at info or above, want %d (one per decision):\n%s", len(decisions), len(want), strings.Join(decisions, "\n"))
	}
	for i, re := range want {
		if !re.MatchString(decisions[i]) {
			t.Errorf("line %d:\n%s\nwant %s", i, decisions[i], re)
		}
	}
}
