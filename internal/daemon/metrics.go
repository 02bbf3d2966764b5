package daemon

import (
	"net/http"
	"runtime"
	"runtime/debug"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"xenblkd/internal/api"
	"xenblkd/internal/metrics"
	"xenblkd/internal/model"
)

// Recovery results, the values of the result label of xenblkd_recoveries_total.
const (
	RecoveryRestored = "restored" // an attachment was rebuilt after a restart
	RecoveryDropped  = "dropped"  // a stored device had no backend any more and was released
	RecoveryFailed   = "failed"   // a stored device or backend could not be recovered
)

var recoveryResults = []string{RecoveryRestored, RecoveryDropped, RecoveryFailed}

// latencyBounds are the histogram buckets of add, remove and pre-setup, in
// seconds: from the sub-millisecond block-device path to libxl's 40 s
// hotplug timeout.
var latencyBounds = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// Metrics are the daemon's Prometheus metrics (docs/metrics.md), on
// prometheus/client_golang. A new metric is a field here, created and
// registered in newMetrics (with every label value it can take, so each
// series exists from the start at 0), set where the daemon decides, and a row
// in docs/metrics.md.
type Metrics struct {
	// Registry holds xenblkd's metrics and the Go runtime and process
	// collectors; the metrics endpoint serves it.
	Registry *prometheus.Registry

	duration   *prometheus.HistogramVec // op: the API's add and remove
	presetup   prometheus.Histogram     // pre-setup's own attaches
	errs       *prometheus.CounterVec   // op, reason
	cacheHits  prometheus.Counter
	recoveries *prometheus.CounterVec // result
	handler    http.Handler           // GET /metrics (internal/metrics)
}

func newMetrics(m *model.Model) *Metrics {
	r := prometheus.NewRegistry()
	x := &Metrics{Registry: r}
	r.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		attachmentsCollector(m),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "xenblkd_loop_devices_held", Help: "Loop devices whose fd the daemon holds.",
		}, func() float64 { return float64(len(m.Held())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "xenblkd_loop_devices_unused", Help: "Loop devices the daemon holds for no backend (normally 0).",
		}, func() float64 {
			n := 0
			for _, h := range m.Held() {
				if h.Users == 0 {
					n++
				}
			}
			return float64(n)
		}),
		loopIOCollector(m),
	)
	x.cacheHits = promauto.With(r).NewCounter(prometheus.CounterOpts{
		Name: "xenblkd_readonly_cache_hits_total", Help: "Read-only adds that reused the loop device of another backend.",
	})
	x.duration = promauto.With(r).NewHistogramVec(prometheus.HistogramOpts{
		Name: "xenblkd_request_duration_seconds", Help: "Time to answer an add or remove request.", Buckets: latencyBounds,
	}, []string{"op"})
	x.presetup = promauto.With(r).NewHistogram(prometheus.HistogramOpts{
		Name:    "xenblkd_presetup_duration_seconds",
		Help:    "Time pre-setup took to attach a backend before its script ran, from reading its nodes to physical-device written.",
		Buckets: latencyBounds,
	})
	x.errs = promauto.With(r).NewCounterVec(prometheus.CounterOpts{
		Name: "xenblkd_errors_total", Help: "Failed add or remove requests, by operation and reason.",
	}, []string{"op", "reason"})
	for _, op := range []string{api.OpAdd, api.OpRemove} {
		x.duration.WithLabelValues(op)
		for _, reason := range Reasons {
			x.errs.WithLabelValues(op, reason)
		}
	}
	x.recoveries = promauto.With(r).NewCounterVec(prometheus.CounterOpts{
		Name: "xenblkd_recoveries_total", Help: "Attachments handled by recovery after a restart, by result.",
	}, []string{"result"})
	for _, res := range recoveryResults {
		x.recoveries.WithLabelValues(res)
	}
	x.handler = metrics.Handler(r)
	return x
}

// RegisterBuildInfo adds xenblkd_build_info, constant 1, labelled with the
// binary's version (main.version), its VCS revision if the build recorded
// one, and the Go version. Call it once, at start.
func (x *Metrics) RegisterBuildInfo(version string) {
	revision := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				revision = s.Value
			}
		}
	}
	x.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "xenblkd_build_info",
		Help:        "Constant 1, labelled with the running binary's version, VCS revision and Go version.",
		ConstLabels: prometheus.Labels{"version": version, "revision": revision, "goversion": runtime.Version()},
	}, func() float64 { return 1 }))
}

// countCollector is a two-label gauge counted at scrape time: count calls
// add once per item; the series in zero are exported at 0 when nothing
// counts them.
type countCollector struct {
	desc  *prometheus.Desc
	zero  [][2]string
	count func(add func(a, b string))
}

func (c countCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c countCollector) Collect(ch chan<- prometheus.Metric) {
	counts := map[[2]string]int{}
	for _, z := range c.zero {
		counts[z] = 0
	}
	c.count(func(a, b string) { counts[[2]string{a, b}]++ })
	for s, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), s[0], s[1])
	}
}

// attachmentsCollector counts the model's attachments by kind and mode,
// every kind and mode also at 0.
func attachmentsCollector(m *model.Model) countCollector {
	var zero [][2]string
	for _, kind := range []string{"file", "block"} {
		for _, mode := range []string{"r", "w", "r!", "w!"} {
			zero = append(zero, [2]string{kind, mode})
		}
	}
	return countCollector{
		desc: prometheus.NewDesc("xenblkd_attachments",
			"Backends attached, by target kind (file, block) and mode (r, w, r!, w!).", []string{"kind", "mode"}, nil),
		zero: zero,
		count: func(add func(a, b string)) {
			for _, a := range m.List() {
				add(kindLabel(a.Target.Kind), a.Mode.String())
			}
		},
	}
}

// loopIOCollector counts the held loop devices by I/O mode to the image file
// and logical block size (iomode.go); direct and buffered at 512 also at 0.
func loopIOCollector(m *model.Model) countCollector {
	return countCollector{
		desc: prometheus.NewDesc("xenblkd_loop_devices_io",
			"Loop devices the daemon holds, by I/O mode to the image file (direct, buffered) and logical block size.", []string{"io", "block_size"}, nil),
		zero: [][2]string{{"direct", "512"}, {"buffered", "512"}},
		count: func(add func(a, b string)) {
			for _, h := range m.Held() {
				add(ioName(h.IO), strconv.FormatUint(uint64(h.IO.BlockSize), 10))
			}
		},
	}
}

func kindLabel(k model.Kind) string {
	if k == model.BlockDevice {
		return "block"
	}
	return "file"
}

// MetricsHandler serves the daemon's metrics (metrics.Serve).
func (d *Daemon) MetricsHandler() http.Handler { return d.metrics.handler }

// RegisterBuildInfo adds the build-info metric for version (Metrics.RegisterBuildInfo).
func (d *Daemon) RegisterBuildInfo(version string) { d.metrics.RegisterBuildInfo(version) }

// countRecoveries counts what one start-up recovery did.
func (x *Metrics) countRecoveries(s RecoverySummary) {
	x.recoveries.WithLabelValues(RecoveryRestored).Add(float64(s.Restored))
	x.recoveries.WithLabelValues(RecoveryDropped).Add(float64(s.Closed))
	x.recoveries.WithLabelValues(RecoveryFailed).Add(float64(s.Rejected + s.Mismatched))
}

// timeRequest starts timing an add or remove; call the result when done.
func (x *Metrics) timeRequest(op string) (done func()) {
	if op != api.OpAdd && op != api.OpRemove {
		return func() {}
	}
	start := time.Now()
	return func() { x.duration.WithLabelValues(op).Observe(time.Since(start).Seconds()) }
}

// presetupAttached records how long one pre-setup attach took, from start.
func (x *Metrics) presetupAttached(start time.Time) { x.presetup.Observe(time.Since(start).Seconds()) }

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
	x.errs.WithLabelValues(op, Reason(err)).Inc()
}
