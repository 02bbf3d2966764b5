package main

import (
	"bytes"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// newLogger returns the daemon's logger: slog's text format (key=value,
// level=INFO|WARN|ERROR as text). When stderr is the journal (systemd sets
// $JOURNAL_STREAM to its device:inode), the timestamp is left out (journald
// stamps every line itself) and every line starts with its syslog priority,
// "<N>" (sd-daemon(3)), so `journalctl -p warning` shows warnings and errors.
// $XENBLKD_LOG_LEVEL=debug adds debug lines.
func newLogger(stderr io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: logLevel(os.Getenv("XENBLKD_LOG_LEVEL"))}
	if f, ok := stderr.(*os.File); ok && isJournal(os.Getenv("JOURNAL_STREAM"), f) {
		opts.ReplaceAttr = dropTime
		stderr = journalWriter{stderr}
	}
	return slog.New(slog.NewTextHandler(stderr, opts))
}

// journalWriter prefixes each record with its syslog priority. slog's text
// handler writes one record per Write, starting with "level=" once the time
// is dropped, and quotes values with newlines, so a record is one line.
type journalWriter struct{ w io.Writer }

func (j journalWriter) Write(p []byte) (int, error) {
	line := make([]byte, 0, len(p)+3)
	line = append(line, '<', priority(p), '>')
	if _, err := j.w.Write(append(line, p...)); err != nil {
		return 0, err
	}
	return len(p), nil
}

// priority maps slog's level text to syslog's: ERROR 3, WARN 4, INFO 6,
// DEBUG 7 (levels in between, "INFO+2", take the one they start with).
func priority(record []byte) byte {
	level, _ := bytes.CutPrefix(record, []byte("level="))
	switch {
	case bytes.HasPrefix(level, []byte("ERROR")):
		return '3'
	case bytes.HasPrefix(level, []byte("WARN")):
		return '4'
	case bytes.HasPrefix(level, []byte("DEBUG")):
		return '7'
	}
	return '6'
}

func logLevel(s string) slog.Level {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return slog.LevelInfo
	}
	return l
}

func dropTime(groups []string, a slog.Attr) slog.Attr {
	if len(groups) == 0 && a.Key == slog.TimeKey {
		return slog.Attr{}
	}
	return a
}

// isJournal reports whether f is the stream $JOURNAL_STREAM ("dev:ino", as
// systemd.exec(5) says) names. A set but different value means stderr was
// redirected (e.g. to a file) and keeps its timestamps.
func isJournal(env string, f *os.File) bool {
	devStr, inoStr, ok := strings.Cut(env, ":")
	if !ok {
		return false
	}
	dev, err1 := strconv.ParseUint(devStr, 10, 64)
	ino, err2 := strconv.ParseUint(inoStr, 10, 64)
	if err1 != nil || err2 != nil {
		return false
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	return uint64(st.Dev) == dev && st.Ino == ino
}
