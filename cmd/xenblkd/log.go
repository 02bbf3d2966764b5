package main

import (
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// newLogger returns the daemon's logger: slog's text format (key=value,
// level=INFO|WARN|ERROR as text). When stderr is the journal (systemd sets
// $JOURNAL_STREAM to its device:inode), the timestamp is left out: journald
// stamps every line itself. $XENBLKD_LOG_LEVEL=debug adds debug lines.
func newLogger(stderr io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: logLevel(os.Getenv("XENBLKD_LOG_LEVEL"))}
	if f, ok := stderr.(*os.File); ok && isJournal(os.Getenv("JOURNAL_STREAM"), f) {
		opts.ReplaceAttr = dropTime
	}
	return slog.New(slog.NewTextHandler(stderr, opts))
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
