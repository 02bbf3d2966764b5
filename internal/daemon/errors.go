package daemon

// Errors are classified here, once: the reason they count as (the reason
// label of xenblkd_errors_total, docs/metrics.md), the level and message of
// their log line, and whether they are transient (worth a retry by the
// exec'd add rather than being remembered).

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"

	"golang.org/x/sys/unix"

	"xenblkd/internal/hotplug"
	"xenblkd/internal/loop"
	"xenblkd/internal/model"
	"xenblkd/internal/xenstore"
)

// Reasons, the values of the reason label of xenblkd_errors_total. The set
// is fixed so a scrape never grows with what clients send.
const (
	ReasonConflict  = "conflict"   // refused by the sharing rules
	ReasonBadParams = "bad_params" // malformed XENBUS_PATH, params or mode; unusable target
	ReasonNotFound  = "not_found"  // the target does not exist
	ReasonXenStore  = "xenstore"   // reading or writing XenStore failed
	ReasonLoop      = "loop"       // the kernel's loop API failed
	ReasonOther     = "other"
)

// Reasons lists every reason, in the order they are written.
var Reasons = []string{ReasonConflict, ReasonBadParams, ReasonNotFound, ReasonXenStore, ReasonLoop, ReasonOther}

// class is how an error of a failed add counts and is logged.
type class struct {
	reason    string     // Reason
	level     slog.Level // of its log line
	msg       string     // of its log line
	transient bool       // worth a retry by the exec'd add
}

// classify says how err counts and is logged: a refusal (bad params or mode,
// a missing target, a sharing conflict) at warning; a failure of XenStore or
// the loop API at error; a transient error (XenStore connection lost,
// backend gone, the daemon stopping) at debug, as its caller retries or says
// so.
func classify(err error) class {
	c := class{reason: Reason(err), level: slog.LevelWarn, msg: "refused"}
	switch {
	case transient(err):
		c.transient, c.level, c.msg = true, slog.LevelDebug, "add interrupted"
	case c.reason == ReasonXenStore || c.reason == ReasonLoop || c.reason == ReasonOther:
		c.level, c.msg = slog.LevelError, "add failed"
	}
	return c
}

// transient reports XenStore unreachable, the daemon stopping, or the
// backend vanishing (or re-created for another disk) under the write.
func transient(err error) bool {
	return errors.Is(err, xenstore.ErrConnectionLost) || errors.Is(err, xenstore.ErrClosed) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, hotplug.ErrBackendGone) || errors.Is(err, hotplug.ErrBackendChanged) || errors.Is(err, unix.EAGAIN)
}

// reasonError tags err with the reason it counts as, unless its cause says
// better (see Reason). Its message is err's.
type reasonError struct {
	reason string
	err    error
}

func (e *reasonError) Error() string { return e.err.Error() }
func (e *reasonError) Unwrap() error { return e.err }

func withReason(reason string, err error) error { return &reasonError{reason: reason, err: err} }

// Reason classifies a failed request: by its cause first (a sharing conflict,
// a XenStore or loop error, a missing target), else by the step that failed.
func Reason(err error) string {
	var xsErr *xenstore.Error
	var loopErr *loop.OpError
	var tagged *reasonError
	switch {
	case errors.Is(err, model.ErrConflict):
		return ReasonConflict
	case errors.As(err, &xsErr), errors.Is(err, xenstore.ErrConnectionLost), errors.Is(err, xenstore.ErrClosed),
		errors.Is(err, hotplug.ErrBackendGone):
		return ReasonXenStore
	case errors.As(err, &loopErr):
		return ReasonLoop
	case errors.Is(err, fs.ErrNotExist):
		return ReasonNotFound
	case errors.As(err, &tagged):
		return tagged.reason
	}
	return ReasonOther
}

// notFoundError is openTarget's "no such file or device"; it matches
// fs.ErrNotExist, so it counts as ReasonNotFound.
type notFoundError struct{ msg string }

func (e *notFoundError) Error() string        { return e.msg }
func (e *notFoundError) Is(target error) bool { return target == fs.ErrNotExist }
