// Package metrics keeps xenblkd's counters, gauges and histograms and writes
// them in the Prometheus text exposition format (version 0.0.4).
//
// It exists instead of prometheus/client_golang because that module links
// net/http and protobuf into the binary, and the hotplug entry point (the same
// binary, exec'd by libxl for every disk) would pay their package
// initialisation on every exec: measured 1.2 ms of a ~2 ms budget (see
// docs/architecture.md). The exposition format is small and stable:
// https://prometheus.io/docs/instrumenting/exposition_formats/
package metrics

import (
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Registry holds metric families in registration order. The zero value is
// ready to use.
type Registry struct {
	mu       sync.Mutex // guards families
	families []family
}

type family interface {
	name() string
	write(w io.Writer) error
}

func (r *Registry) register(f family) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, g := range r.families {
		if g.name() == f.name() {
			panic("metrics: duplicate metric " + f.name())
		}
	}
	r.families = append(r.families, f)
}

// WriteText writes every metric in the text exposition format.
func (r *Registry) WriteText(w io.Writer) error {
	r.mu.Lock()
	families := append([]family(nil), r.families...)
	r.mu.Unlock()
	for _, f := range families {
		if err := f.write(w); err != nil {
			return err
		}
	}
	return nil
}

// ContentType is the HTTP Content-Type of WriteText's output.
const ContentType = "text/plain; version=0.0.4; charset=utf-8"

func header(w io.Writer, name, help, typ string) error {
	_, err := fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", name, escapeHelp(help), name, typ)
	return err
}

// CounterVec is a counter partitioned by the values of a fixed label set.
type CounterVec struct {
	n, help string
	labels  []string
	mu      sync.Mutex // guards values
	values  map[string]*atomic.Uint64
}

// NewCounterVec registers a counter with the given label names (none is fine).
func (r *Registry) NewCounterVec(name, help string, labels ...string) *CounterVec {
	c := &CounterVec{n: name, help: help, labels: labels, values: map[string]*atomic.Uint64{}}
	r.register(c)
	return c
}

func (c *CounterVec) name() string { return c.n }

// Add adds delta to the series with these label values (in label order).
func (c *CounterVec) Add(delta uint64, labelValues ...string) {
	c.series(labelValues).Add(delta)
}

// Inc adds one.
func (c *CounterVec) Inc(labelValues ...string) { c.Add(1, labelValues...) }

// Value returns the current value of one series (for tests and status).
func (c *CounterVec) Value(labelValues ...string) uint64 { return c.series(labelValues).Load() }

func (c *CounterVec) series(labelValues []string) *atomic.Uint64 {
	if len(labelValues) != len(c.labels) {
		panic(fmt.Sprintf("metrics: %s wants %d label values, got %d", c.n, len(c.labels), len(labelValues)))
	}
	key := formatLabels(c.labels, labelValues)
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.values[key]
	if !ok {
		v = new(atomic.Uint64)
		c.values[key] = v
	}
	return v
}

func (c *CounterVec) write(w io.Writer) error {
	if err := header(w, c.n, c.help, "counter"); err != nil {
		return err
	}
	c.mu.Lock()
	keys := make([]string, 0, len(c.values))
	for k := range c.values {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	lines := make([]string, len(keys))
	for i, k := range keys {
		lines[i] = c.n + k + " " + strconv.FormatUint(c.values[k].Load(), 10) + "\n"
	}
	c.mu.Unlock()
	_, err := io.WriteString(w, strings.Join(lines, ""))
	return err
}

// GaugeFunc is a gauge whose value is read when metrics are written.
type GaugeFunc struct {
	n, help string
	fn      func() float64
}

// NewGaugeFunc registers a gauge computed by fn at scrape time.
func (r *Registry) NewGaugeFunc(name, help string, fn func() float64) *GaugeFunc {
	g := &GaugeFunc{n: name, help: help, fn: fn}
	r.register(g)
	return g
}

func (g *GaugeFunc) name() string { return g.n }

func (g *GaugeFunc) write(w io.Writer) error {
	if err := header(w, g.n, g.help, "gauge"); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "%s %s\n", g.n, formatFloat(g.fn()))
	return err
}

// HistogramVec is a histogram with fixed upper bounds, partitioned by labels.
type HistogramVec struct {
	n, help string
	labels  []string
	bounds  []float64
	mu      sync.Mutex // guards series and every histogram in it
	series  map[string]*histogram
}

type histogram struct {
	counts []uint64 // per bucket, not cumulative
	count  uint64
	sum    float64
}

// NewHistogramVec registers a histogram with the given bucket upper bounds
// (ascending; +Inf is implied).
func (r *Registry) NewHistogramVec(name, help string, bounds []float64, labels ...string) *HistogramVec {
	if !sort.Float64sAreSorted(bounds) {
		panic("metrics: histogram bounds must be ascending: " + name)
	}
	h := &HistogramVec{n: name, help: help, labels: labels, bounds: bounds, series: map[string]*histogram{}}
	r.register(h)
	return h
}

func (h *HistogramVec) name() string { return h.n }

// Observe records one value in the series with these label values.
func (h *HistogramVec) Observe(v float64, labelValues ...string) {
	if len(labelValues) != len(h.labels) {
		panic(fmt.Sprintf("metrics: %s wants %d label values, got %d", h.n, len(h.labels), len(labelValues)))
	}
	key := formatLabels(h.labels, labelValues)
	i := sort.SearchFloat64s(h.bounds, v) // first bound >= v
	h.mu.Lock()
	defer h.mu.Unlock()
	s, ok := h.series[key]
	if !ok {
		s = &histogram{counts: make([]uint64, len(h.bounds)+1)}
		h.series[key] = s
	}
	s.counts[i]++
	s.count++
	s.sum += v
}

// Count returns how many values one series has recorded.
func (h *HistogramVec) Count(labelValues ...string) uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	if s, ok := h.series[formatLabels(h.labels, labelValues)]; ok {
		return s.count
	}
	return 0
}

func (h *HistogramVec) write(w io.Writer) error {
	if err := header(w, h.n, h.help, "histogram"); err != nil {
		return err
	}
	h.mu.Lock()
	keys := make([]string, 0, len(h.series))
	for k := range h.series {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		s := h.series[k]
		var cum uint64
		for i, bound := range append(append([]float64(nil), h.bounds...), math.Inf(1)) {
			cum += s.counts[i]
			fmt.Fprintf(&b, "%s_bucket%s %d\n", h.n, withLabel(k, "le", formatFloat(bound)), cum)
		}
		fmt.Fprintf(&b, "%s_sum%s %s\n%s_count%s %d\n", h.n, k, formatFloat(s.sum), h.n, k, s.count)
	}
	h.mu.Unlock()
	_, err := io.WriteString(w, b.String())
	return err
}

// formatLabels renders {a="x",b="y"}, or "" without labels.
func formatLabels(names, values []string) string {
	if len(names) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteByte('{')
	for i, n := range names {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(n)
		b.WriteString(`="`)
		b.WriteString(escapeLabel(values[i]))
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

// withLabel adds one more label to an already formatted label set.
func withLabel(set, name, value string) string {
	l := name + `="` + escapeLabel(value) + `"`
	if set == "" {
		return "{" + l + "}"
	}
	return set[:len(set)-1] + "," + l + "}"
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)
var helpEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`)

func escapeLabel(s string) string { return labelEscaper.Replace(s) }
func escapeHelp(s string) string  { return helpEscaper.Replace(s) }

func formatFloat(f float64) string {
	switch {
	case math.IsInf(f, 1):
		return "+Inf"
	case math.IsInf(f, -1):
		return "-Inf"
	case math.IsNaN(f):
		return "NaN"
	}
	return strconv.FormatFloat(f, 'g', -1, 64)
}
