package metrics

import (
	"strings"
	"testing"
)

func TestWriteText(t *testing.T) {
	var r Registry
	adds := r.NewCounterVec("xenblkd_adds_total", "Hotplug adds by result.", "result")
	r.NewGaugeFunc("xenblkd_loop_devices", "Loop devices held.", func() float64 { return 3 })
	lat := r.NewHistogramVec("xenblkd_add_seconds", "Add latency.", []float64{0.001, 0.01}, "kind")
	adds.Inc("ok")
	adds.Add(2, "ok")
	adds.Inc(`bad "input"`)
	lat.Observe(0.0005, "file")
	lat.Observe(0.005, "file")
	lat.Observe(1, "file")

	var b strings.Builder
	if err := r.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	want := `# HELP xenblkd_adds_total Hotplug adds by result.
# TYPE xenblkd_adds_total counter
xenblkd_adds_total{result="bad \"input\""} 1
xenblkd_adds_total{result="ok"} 3
# HELP xenblkd_loop_devices Loop devices held.
# TYPE xenblkd_loop_devices gauge
xenblkd_loop_devices 3
# HELP xenblkd_add_seconds Add latency.
# TYPE xenblkd_add_seconds histogram
xenblkd_add_seconds_bucket{kind="file",le="0.001"} 1
xenblkd_add_seconds_bucket{kind="file",le="0.01"} 2
xenblkd_add_seconds_bucket{kind="file",le="+Inf"} 3
xenblkd_add_seconds_sum{kind="file"} 1.0055
xenblkd_add_seconds_count{kind="file"} 3
`
	if got := b.String(); got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
	if got := lat.Count("file"); got != 3 {
		t.Errorf("Count = %d, want 3", got)
	}
}

func TestBucketBoundaryIsInclusive(t *testing.T) {
	var r Registry
	h := r.NewHistogramVec("h", "h", []float64{1, 2})
	h.Observe(1) // le="1" includes 1
	var b strings.Builder
	_ = r.WriteText(&b)
	if !strings.Contains(b.String(), `h_bucket{le="1"} 1`) {
		t.Errorf("value on a bound not counted in that bucket:\n%s", b.String())
	}
}

func TestDuplicatePanics(t *testing.T) {
	var r Registry
	r.NewCounterVec("c", "c")
	defer func() {
		if recover() == nil {
			t.Error("registering a duplicate name did not panic")
		}
	}()
	r.NewCounterVec("c", "c")
}
