package entry

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzReply serves fuzzed replies to the sanitizer build of the entry and
// checks its verdict against the reference below: success exactly for a
// first line starting {"ok":true followed by ',' or '}', otherwise a
// hand-over carrying that line (up to a NUL, which an environment variable
// cannot hold), or an error when no whole line came. Any ASan or UBSan
// finding fails it. The seed corpus (testdata/fuzz/FuzzReply and the f.Add
// lines) runs in every go test.
func FuzzReply(f *testing.F) {
	for _, seed := range []string{
		`{"ok":true}` + "\n",
		`{"ok":true,"attachment":{"domid":1}}` + "\n",
		`{"ok":true` + "\n",
		`{"ok":true}`,
		`{"ok":false,"error":"x"}` + "\n",
		"{\"ok\":true\x00}\n",
		"\n",
		"",
		strings.Repeat("a", 70<<10),
		strings.Repeat("a", 64<<10-1) + "\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 128<<10 {
			// Not an environment gate (plain t.Skip): a generated input
			// this large tests nothing more than a 128 KiB one.
			t.Skip("larger than any reply the entry reads")
		}
		fake := startFake(t, reply{chunks: []string{string(data)}})
		r := run(t, builds["sanitize"], []string{"add"}, "XENBUS_PATH="+be, "XENBLKD_SOCKET="+fake.socket)
		const maxReply = 64 << 10
		window := data[:min(len(data), maxReply)]
		i := bytes.IndexByte(window, '\n')
		switch {
		case i < 0 && len(data) >= maxReply:
			if r.over == nil || r.over.Error == nil || !strings.Contains(*r.over.Error, "larger than 64 KiB") {
				t.Fatalf("%d bytes without a newline: exit %d, hand-over %+v; want the too-large error", len(data), r.code, r.over)
			}
		case i < 0:
			if r.over == nil || r.over.Error == nil || r.over.Reply != nil {
				t.Fatalf("no whole line (%q): exit %d, hand-over %+v; want an error", data, r.code, r.over)
			}
		default:
			line := data[:i]
			ok := bytes.HasPrefix(line, []byte(`{"ok":true`)) && len(line) > 10 && (line[10] == ',' || line[10] == '}')
			if ok {
				if r.code != 0 {
					t.Fatalf("reply %q: exit %d, hand-over %+v; want success", data, r.code, r.over)
				}
				return
			}
			want := string(line)
			if j := strings.IndexByte(want, 0); j >= 0 {
				want = want[:j]
			}
			if r.over == nil || r.over.Reply == nil || *r.over.Reply != want || r.over.Error != nil {
				t.Fatalf("reply %q: exit %d, hand-over %+v; want XENBLKD_ENTRY_REPLY=%q", data, r.code, r.over, want)
			}
		}
	})
}

// TestSeedCorpusPresent keeps the checked-in corpus from vanishing unnoticed.
func TestSeedCorpusPresent(t *testing.T) {
	files, _ := filepath.Glob("testdata/fuzz/FuzzReply/*")
	if len(files) == 0 {
		t.Fatal("testdata/fuzz/FuzzReply is empty")
	}
	for _, f := range files {
		if b, err := os.ReadFile(f); err != nil || !bytes.HasPrefix(b, []byte("go test fuzz v1\n")) {
			t.Errorf("%s: not a go fuzz corpus file (%v)", f, err)
		}
	}
}
