package daemon

import (
	"errors"
	"io/fs"
	"time"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/loop"
	"xenblkd/internal/metrics"
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

// Recovery results, the values of the result label of xenblkd_recoveries_total.
const (
	RecoveryRestored = "restored" // an attachment was rebuilt after a restart
	RecoveryDropped  = "dropped"  // a stored device had no backend any more and was released
	RecoveryFailed   = "failed"   // a stored device or backend could not be recovered
)

var recoveryResults = []string{RecoveryRestored, RecoveryDropped, RecoveryFailed}

// latencyBounds are the histogram buckets of add and remove, in seconds:
// from the sub-millisecond block-device path to libxl's 40 s hotplug timeout.
var latencyBounds = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// Metrics are the daemon's Prometheus metrics (docs/metrics.md).
type Metrics struct {
	Registry   metrics.Registry
	duration   *metrics.HistogramVec // op
	errs       *metrics.CounterVec   // op, reason
	cacheHits  *metrics.CounterVec
	recoveries *metrics.CounterVec // result
}

func newMetrics(m *model.Model) *Metrics {
	x := &Metrics{}
	r := &x.Registry
	r.NewGaugeVecFunc("xenblkd_attachments", "Backends attached, by target kind (file, block) and mode (r, w, r!, w!).",
		[]string{"kind", "mode"}, func(emit func(float64, ...string)) {
			for _, kind := range []string{"file", "block"} {
				for _, mode := range []string{"r", "w", "r!", "w!"} {
					emit(0, kind, mode) // every series exists, also at 0
				}
			}
			for _, a := range m.List() {
				emit(1, kindLabel(a.Target.Kind), a.Mode.String())
			}
		})
	r.NewGaugeFunc("xenblkd_loop_devices_held", "Loop devices whose fd the daemon holds.",
		func() float64 { return float64(len(m.Held())) })
	r.NewGaugeFunc("xenblkd_loop_devices_unused", "Loop devices the daemon holds for no backend (normally 0).",
		func() float64 {
			n := 0
			for _, h := range m.Held() {
				if h.Users == 0 {
					n++
				}
			}
			return float64(n)
		})
	x.cacheHits = r.NewCounterVec("xenblkd_readonly_cache_hits_total", "Read-only adds that reused the loop device of another backend.")
	x.cacheHits.Add(0)
	x.duration = r.NewHistogramVec("xenblkd_request_duration_seconds", "Time to answer an add or remove request.", latencyBounds, "op")
	x.errs = r.NewCounterVec("xenblkd_errors_total", "Failed add or remove requests, by operation and reason.", "op", "reason")
	for _, op := range []string{api.OpAdd, api.OpRemove} {
		for _, reason := range Reasons {
			x.errs.Add(0, op, reason)
		}
	}
	x.recoveries = r.NewCounterVec("xenblkd_recoveries_total", "Attachments handled by recovery after a restart, by result.", "result")
	for _, res := range recoveryResults {
		x.recoveries.Add(0, res)
	}
	return x
}

func kindLabel(k model.Kind) string {
	if k == model.BlockDevice {
		return "block"
	}
	return "file"
}

// Metrics returns the daemon's metrics.
func (d *Daemon) Metrics() *Metrics { return d.metrics }

// countRecoveries counts what one start-up recovery did.
func (x *Metrics) countRecoveries(s RecoverySummary) {
	x.recoveries.Add(uint64(s.Restored), RecoveryRestored)
	x.recoveries.Add(uint64(s.Closed), RecoveryDropped)
	x.recoveries.Add(uint64(s.Rejected+s.Mismatched), RecoveryFailed)
}

// CountRecovery counts one attachment handled by recovery; result is
// RecoveryRestored, RecoveryDropped or RecoveryFailed (anything else counts
// as failed).
func (x *Metrics) CountRecovery(result string) {
	switch result {
	case RecoveryRestored, RecoveryDropped:
	default:
		result = RecoveryFailed
	}
	x.recoveries.Inc(result)
}

// timeRequest starts timing an add or remove; call the result when done.
func (x *Metrics) timeRequest(op string) (done func()) {
	if op != api.OpAdd && op != api.OpRemove {
		return func() {}
	}
	start := time.Now()
	return func() { x.duration.Observe(time.Since(start).Seconds(), op) }
}

// attached counts a cache hit when a read-only file attachment shares its
// loop device with another backend.
func (x *Metrics) attached(a model.Attachment) {
	if a.Target.Kind == model.RegularFile && !a.Mode.Writable && a.Users > 1 {
		x.cacheHits.Inc()
	}
}

func (x *Metrics) countError(op string, err error) {
	if op != api.OpAdd && op != api.OpRemove {
		return
	}
	x.errs.Inc(op, Reason(err))
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
