package api

import (
	"encoding/json"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestEntryAgrees: the C entry (cmd/xenblkd-hotplug) cannot import this
// package, so what it shares with it is compared here: the socket path, the
// reply timeout, and the prefix by which it recognises a success.
func TestEntryAgrees(t *testing.T) {
	src, err := os.ReadFile("../../cmd/xenblkd-hotplug/xenblkd-hotplug.c")
	if err != nil {
		t.Fatal(err)
	}
	define := func(name string) string {
		m := regexp.MustCompile(`(?m)^#define ` + name + ` (.+)$`).FindSubmatch(src)
		if m == nil {
			t.Fatalf("the C entry has no #define %s", name)
		}
		return strings.TrimSpace(string(m[1]))
	}
	if got := define("DEFAULT_SOCKET"); got != strconv.Quote(DefaultSocket) {
		t.Errorf("C DEFAULT_SOCKET = %s, want %q (api.DefaultSocket)", got, DefaultSocket)
	}
	if got, want := define("REPLY_TIMEOUT_SEC"), strconv.Itoa(int(ReplyTimeout/time.Second)); got != want {
		t.Errorf("C REPLY_TIMEOUT_SEC = %s, want %s (api.ReplyTimeout)", got, want)
	}
	if !strings.Contains(string(src), `"{\"ok\":true"`) {
		t.Error(`the C entry no longer looks for the prefix {"ok":true: update TestEntryAgrees and the reply's field order together`)
	}
	if strings.Contains(string(src), "35 s") {
		t.Error("the C entry writes the reply timeout as a literal; use XSTR(REPLY_TIMEOUT_SEC)")
	}
}

// TestReplyPrefix pins what the C entry relies on: a successful reply starts
// {"ok":true followed by ',' or '}', whatever else it carries.
func TestReplyPrefix(t *testing.T) {
	for _, r := range []Response{
		{OK: true},
		{OK: true, Attachment: &Attachment{Domid: 7, Devid: 51712, Device: "/dev/loop3"}},
		{OK: true, Summary: "x", Attachments: []Attachment{{}}},
	} {
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(string(b), `{"ok":true`) || (b[10] != ',' && b[10] != '}') {
			t.Errorf("reply %s: the C entry would not recognise it as a success", b)
		}
	}
	b, _ := json.Marshal(Response{Error: "x"})
	if strings.HasPrefix(string(b), `{"ok":true`) {
		t.Errorf("error reply %s starts like a success", b)
	}
}

// TestTimeoutsDerived: each timeout leaves the next one room, below libxl's kill.
func TestTimeoutsDerived(t *testing.T) {
	if !(RequestTimeout < ReplyTimeout && ReplyTimeout < HotplugTimeout) {
		t.Errorf("RequestTimeout %v, ReplyTimeout %v, HotplugTimeout %v: want increasing", RequestTimeout, ReplyTimeout, HotplugTimeout)
	}
	if Timeout(OpAdd) != ReplyTimeout || Timeout(OpRemove) != ReplyTimeout || Timeout(OpAdopt) != 0 {
		t.Errorf("Timeout: add %v, remove %v, adopt %v; want %v, %v, 0", Timeout(OpAdd), Timeout(OpRemove), Timeout(OpAdopt), ReplyTimeout, ReplyTimeout)
	}
}
