package main

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// TestJournalPriorities: with stderr being the journal stream, every line
// carries its syslog priority and no timestamp; otherwise lines are plain.
func TestJournalPriorities(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "stderr")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	t.Setenv("JOURNAL_STREAM", strconv.FormatUint(uint64(st.Dev), 10)+":"+strconv.FormatUint(st.Ino, 10))
	t.Setenv("XENBLKD_LOG_LEVEL", "debug")
	log := newLogger(f)
	log.Debug("d")
	log.Info("i", "k", "two\nlines")
	log.Warn("w")
	log.Error("e")
	log.Log(context.Background(), slog.LevelInfo+2, "i2")
	b, _ := os.ReadFile(f.Name())
	want := "<7>level=DEBUG msg=d\n<6>level=INFO msg=i k=\"two\\nlines\"\n<4>level=WARN msg=w\n<3>level=ERROR msg=e\n<6>level=INFO+2 msg=i2\n"
	if string(b) != want {
		t.Errorf("journal lines:\n%s\nwant:\n%s", b, want)
	}

	// Not the journal: timestamps, no priorities.
	t.Setenv("JOURNAL_STREAM", "1:2")
	var buf bytes.Buffer
	newLogger(&buf).Warn("w")
	if !strings.HasPrefix(buf.String(), "time=") {
		t.Errorf("plain line %q, want a timestamp first", buf.String())
	}
}

func TestPriority(t *testing.T) {
	for in, want := range map[string]byte{"level=ERROR msg=x": '3', "level=ERROR+1 msg=x": '3', "level=WARN msg=x": '4',
		"level=INFO msg=x": '6', "level=DEBUG-2 msg=x": '7', "garbage": '6'} {
		if got := priority([]byte(in)); got != want {
			t.Errorf("priority(%q) = %c, want %c", in, got, want)
		}
	}
}
