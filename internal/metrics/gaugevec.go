package metrics

import (
	"fmt"
	"io"
	"sort"
	"strings"
)

// GaugeVecFunc is a gauge partitioned by labels whose series are computed at
// scrape time, e.g. attachments by kind and mode counted from the model.
type GaugeVecFunc struct {
	n, help string
	labels  []string
	fn      func(emit func(value float64, labelValues ...string))
}

// NewGaugeVecFunc registers a gauge whose series fn emits, once per label
// value set, each time metrics are written. Emitting the same set twice adds
// the values.
func (r *Registry) NewGaugeVecFunc(name, help string, labels []string, fn func(emit func(value float64, labelValues ...string))) *GaugeVecFunc {
	g := &GaugeVecFunc{n: name, help: help, labels: labels, fn: fn}
	r.register(g)
	return g
}

func (g *GaugeVecFunc) name() string { return g.n }

func (g *GaugeVecFunc) write(w io.Writer) error {
	values := map[string]float64{}
	g.fn(func(v float64, labelValues ...string) {
		if len(labelValues) != len(g.labels) {
			panic(fmt.Sprintf("metrics: %s wants %d label values, got %d", g.n, len(g.labels), len(labelValues)))
		}
		values[formatLabels(g.labels, labelValues)] += v
	})
	keys := make([]string, 0, len(values))
	for k := range values {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(g.n + k + " " + formatFloat(values[k]) + "\n")
	}
	if err := header(w, g.n, g.help, "gauge"); err != nil {
		return err
	}
	_, err := io.WriteString(w, b.String())
	return err
}
