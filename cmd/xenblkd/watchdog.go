package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"xenblkd/internal/api"
	"xenblkd/internal/fdstore"
)

// watchdogInterval returns how often to send WATCHDOG=1: half of
// $WATCHDOG_USEC (set by systemd for WatchdogSec=), as sd_watchdog_enabled
// advises; 0 when the watchdog is off or meant for another process.
func watchdogInterval(getenv func(string) string, pid int) time.Duration {
	usec, err := strconv.ParseUint(getenv("WATCHDOG_USEC"), 10, 63)
	if err != nil || usec == 0 {
		return 0
	}
	if p := getenv("WATCHDOG_PID"); p != "" && p != strconv.Itoa(pid) {
		return 0
	}
	return time.Duration(usec) * time.Microsecond / 2
}

// healthCheck reports why the daemon cannot do its work, or nil.
type healthCheck func(ctx context.Context) error

// daemonHealth: the API accept loop answers a ping on the daemon's own
// socket, and the XenStore connection is up.
func daemonHealth(socket string, xenstoreUp func() bool) healthCheck {
	return func(ctx context.Context) error {
		if !xenstoreUp() {
			return errors.New("no XenStore connection (redialling)")
		}
		resp, err := api.Call(ctx, socket, api.Request{Op: api.OpPing})
		if err == nil && !resp.OK {
			err = errors.New(resp.Error)
		}
		if err != nil {
			return fmt.Errorf("the API does not answer on %s: %w", socket, err)
		}
		return nil
	}
}

// runWatchdog sends WATCHDOG=1 every interval while healthy says so; while it
// does not, it sends nothing (systemd then kills and restarts the daemon
// after WatchdogSec=, keeping the fd store) and logs the reason once per
// change. It returns when ctx is done.
func runWatchdog(ctx context.Context, log *slog.Logger, interval time.Duration, healthy healthCheck) {
	t := time.NewTicker(interval)
	defer t.Stop()
	var last error
	for {
		cctx, cancel := context.WithTimeout(ctx, interval)
		err := healthy(cctx)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err != nil && (last == nil || err.Error() != last.Error()):
			log.Warn("watchdog: not telling systemd we are alive", "reason", err)
		case err == nil && last != nil:
			log.Info("watchdog: healthy again")
		}
		last = err
		if err == nil {
			if nerr := fdstore.Notify("WATCHDOG=1"); nerr != nil {
				log.Warn("watchdog: could not notify systemd", "err", nerr)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
