package fdstore

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"
)

func TestSizeWarning(t *testing.T) {
	for _, tc := range []struct {
		name                string
		before, after, size int
		want                string // a word of the warning, "" for none
	}{
		{"size unknown (systemd 252)", 99, 100, 0, ""},
		{"below 90 %", 10, 11, 100, ""},
		{"reaches 90 %", 89, 90, 100, "nearly full"},
		{"already past 90 %", 90, 91, 100, ""},
		{"reaches the size", 99, 100, 100, ""},
		{"exceeds the size", 100, 101, 100, "store full"},
		{"jumps past both", 50, 150, 100, "store full"},
		{"already past the size", 101, 102, 100, ""},
		{"going down", 101, 90, 100, ""},
		{"90 % of a small store rounds up", 8, 9, 10, "nearly full"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := sizeWarning(tc.before, tc.after, tc.size)
			if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
				t.Errorf("sizeWarning(%d, %d, %d) = %q, want %q", tc.before, tc.after, tc.size, got, tc.want)
			}
		})
	}
}

// TestStoreWarnsBeforeFull: with $FDSTORE=10 (systemd >= 254), the push that
// reaches 9 fds and the one beyond 10 each log one warning; removals count.
func TestStoreWarnsBeforeFull(t *testing.T) {
	recv := fakeManager(t, "@"+fmt.Sprintf("xenblkd-test-fdstore-size-%d-%d", os.Getpid(), time.Now().UnixNano()))
	t.Setenv("FDSTORE", "10")
	var logged bytes.Buffer
	prev := slog.Default()
	slog.SetDefault(slog.New(slog.NewTextHandler(&logged, nil)))
	t.Cleanup(func() { slog.SetDefault(prev) })
	// A count of its own: other tests leave names stored.
	saved := stored.held
	stored.held, stored.total = map[string]int{}, 0
	t.Cleanup(func() {
		stored.mu.Lock()
		defer stored.mu.Unlock()
		stored.held, stored.total = saved, 0
		for _, n := range saved {
			stored.total += n
		}
	})
	fds := tempFDs(t, 1)
	store := func(name string) {
		t.Helper()
		if err := Store(name, fds...); err != nil {
			t.Fatal(err)
		}
		recv() // FDSTOREREMOVE
		recv() // FDSTORE
	}
	var names []string
	for i := range 11 {
		name := fmt.Sprintf("loop-%d-1", 1000+i)
		names = append(names, name)
		store(name)
		got := strings.Count(logged.String(), "level=WARN")
		want := 0
		if stored.total >= 9 {
			want++
		}
		if stored.total > 10 {
			want++
		}
		if got != want {
			t.Fatalf("after %d fds stored: %d warnings, want %d:\n%s", stored.total, got, want, logged.String())
		}
	}
	// Storing under a name already stored replaces it: no growth, no warning.
	store(names[0])
	if n := strings.Count(logged.String(), "level=WARN"); n != 2 || stored.total != 11 {
		t.Errorf("re-store: %d fds, %d warnings; want 11, 2", stored.total, n)
	}
	for _, name := range names {
		if err := Remove(name); err != nil {
			t.Fatal(err)
		}
		recv()
	}
	if stored.total != 0 {
		t.Errorf("after removing all: %d fds counted, want 0", stored.total)
	}
}
