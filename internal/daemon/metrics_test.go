package daemon

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	prommodel "github.com/prometheus/common/model"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/metrics"
	"xenblkd/internal/model"
	"xenblkd/internal/server"
	"xenblkd/internal/testenv"
	"xenblkd/internal/xenstore"
)

// observed is a daemon (fake loop devices, fake xenstored) that also serves
// metrics on addr.
type observed struct {
	*env
	d    *Daemon
	addr string // metrics listener address
}

func startObserved(t *testing.T, metricsAddr string) *observed {
	t.Helper()
	e, l := newEnv(t)
	if metricsAddr == "unix" {
		metricsAddr = "unix:" + filepath.Join(e.dir, "metrics.sock")
	}
	ml, err := metrics.Listen(metricsAddr)
	if err != nil {
		l.Close()
		t.Fatal(err)
	}
	serve(t,
		func(ctx context.Context) error { return server.Serve(ctx, l, e.d, discard) },
		func(ctx context.Context) error { return metrics.Serve(ctx, ml, e.d.MetricsHandler(), discard) })
	return &observed{env: e, d: e.d, addr: ml.Addr().Network() + ":" + ml.Addr().String()}
}

// get sends raw to the metrics endpoint and returns the reply, its body read.
func (o *observed) get(t *testing.T, raw string) (*http.Response, string) {
	t.Helper()
	network, addr, _ := strings.Cut(o.addr, ":")
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	method, _, _ := strings.Cut(raw, " ")
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: method})
	if err != nil {
		t.Fatalf("read reply to %q: %v", raw, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(body)
}

func (o *observed) call(t *testing.T, op, be string) api.Response {
	t.Helper()
	resp, err := api.Call(context.Background(), o.socket, api.Request{Op: op, Path: be})
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func writeImage(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte("image"), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestMetricsEndpoint(t *testing.T) {
	o := startObserved(t, "127.0.0.1:0")
	ro, rw := writeImage(t, "ro.img"), writeImage(t, "rw.img")
	for _, step := range []struct {
		domid  int
		params string
		mode   string
		ok     bool
	}{
		{1, ro, "r", true},
		{2, ro, "r", true}, // cache hit
		{3, rw, "w", true},
		{4, "/nonexistent/disk.img", "w", false}, // not_found
		{5, ro, "w", false},                      // conflict with 1 and 2
		{6, rw, "x", false},                      // bad_params
	} {
		be := o.backend(t, step.domid, 51712, step.params, step.mode)
		if resp := o.call(t, "add", be); resp.OK != step.ok {
			t.Fatalf("add domain %d: %+v, want ok=%v", step.domid, resp, step.ok)
		}
	}
	if resp := o.call(t, "add", "backend/vbd/x/1"); resp.OK {
		t.Fatal("add of a malformed path succeeded")
	}

	resp, body := o.get(t, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n")
	if ct := resp.Header.Get("Content-Type"); resp.StatusCode != 200 || !strings.HasPrefix(ct, textFormat) {
		t.Fatalf("GET /metrics: %d %q\n%s", resp.StatusCode, ct, body)
	}
	checkExposition(t, body)
	for _, want := range []string{
		`xenblkd_attachments{kind="file",mode="r"} 2`,
		`xenblkd_attachments{kind="file",mode="w"} 1`,
		`xenblkd_attachments{kind="block",mode="w"} 0`,
		`xenblkd_loop_devices_held 2`,
		`xenblkd_loop_devices_unused 0`,
		`xenblkd_loop_devices_io{block_size="512",io="direct"} 1`, // the fake host: odd numbers buffered, even direct
		`xenblkd_loop_devices_io{block_size="512",io="buffered"} 1`,
		`xenblkd_readonly_cache_hits_total 1`,
		`xenblkd_errors_total{op="add",reason="not_found"} 1`,
		`xenblkd_errors_total{op="add",reason="conflict"} 1`,
		`xenblkd_errors_total{op="add",reason="bad_params"} 2`,
		`xenblkd_errors_total{op="add",reason="other"} 0`,
		`xenblkd_errors_total{op="remove",reason="xenstore"} 0`,
		`xenblkd_request_duration_seconds_count{op="add"} 7`,
		`xenblkd_request_duration_seconds_count{op="remove"} 0`,
		`xenblkd_presetup_duration_seconds_count 0`, // no pre-setup in this daemon
		`xenblkd_recoveries_total{result="restored"} 0`,
		`promhttp_metric_handler_requests_total{code="200"} 0`, // counted after the reply
	} {
		if !containsLine(body, want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}

	o.d.metrics.countRecoveries(RecoverySummary{Restored: 1, Mismatched: 1})
	for _, dom := range []int{1, 2, 3} {
		o.call(t, "remove", fmt.Sprintf("backend/vbd/%d/51712", dom))
	}
	_, body = o.get(t, "GET /metrics?from=test HTTP/1.0\r\n\r\n")
	checkExposition(t, body)
	for _, want := range []string{
		`xenblkd_attachments{kind="file",mode="r"} 0`,
		`xenblkd_loop_devices_held 0`,
		`xenblkd_loop_devices_io{block_size="512",io="direct"} 0`,
		`xenblkd_request_duration_seconds_count{op="remove"} 3`,
		`xenblkd_recoveries_total{result="restored"} 1`,
		`xenblkd_recoveries_total{result="failed"} 1`,
		`promhttp_metric_handler_requests_total{code="200"} 1`,
	} {
		if !containsLine(body, want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}
}

func TestMetricsHTTP(t *testing.T) {
	o := startObserved(t, "unix")
	for _, tc := range []struct {
		name, raw string
		want      int
		body      bool
	}{
		{"get", "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200, true},
		{"http/1.0 with bare newlines", "GET /metrics HTTP/1.0\n\n", 200, true},
		{"head", "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200, false},
		{"root", "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 404, true},
		{"other path", "GET /metricsx HTTP/1.1\r\nHost: x\r\n\r\n", 404, true},
		{"post", "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, true},
		{"no host", "GET /metrics HTTP/1.1\r\n\r\n", 400, true},
		{"garbage", "hello\r\n\r\n", 400, true},
		{"headers too long", "GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + strings.Repeat("a", 2*metrics.MaxHeader) + "\r\n\r\n", 431, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, body := o.get(t, tc.raw)
			if resp.StatusCode != tc.want || (body != "") != tc.body {
				t.Errorf("got %d with %d bytes of body, want %d (body %v)", resp.StatusCode, len(body), tc.want, tc.body)
			}
		})
	}
}

// TestMetricsScrapeConcurrent: scrapes in parallel with adds and removes, as
// Prometheus and an operator's curl may overlap with VM starts (-race).
func TestMetricsScrapeConcurrent(t *testing.T) {
	o := startObserved(t, "127.0.0.1:0")
	img := writeImage(t, "shared.img")
	client := &http.Client{Timeout: 10 * time.Second}
	url := "http://" + strings.TrimPrefix(o.addr, "tcp:") + metrics.Path
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for range 20 {
				resp, err := client.Get(url)
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 && resp.StatusCode != 503 { // 503: more than metrics.MaxInFlight at once
					t.Errorf("scraper %d: %s", w, resp.Status)
				}
			}
		})
	}
	for dom := range 10 {
		be := o.backend(t, 100+dom, 51712, img, "r")
		if resp := o.call(t, "add", be); !resp.OK {
			t.Fatalf("add: %+v", resp)
		}
		o.call(t, "remove", be)
	}
	wg.Wait()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	checkExposition(t, string(body))
	for _, want := range []string{`xenblkd_request_duration_seconds_count{op="add"} 10`, `xenblkd_loop_devices_held 0`} {
		if !containsLine(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// TestServeMetricsStops: metrics.Serve returns once its context ends, and
// the endpoint is gone.
func TestServeMetricsStops(t *testing.T) {
	e, l := newEnv(t)
	l.Close()
	ml, err := metrics.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- metrics.Serve(ctx, ml, e.d.MetricsHandler(), discard) }()
	addr := ml.Addr().String()
	resp, err := http.Get("http://" + addr + metrics.Path)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("metrics.Serve: %v", err)
		}
	case <-time.After(2 * metrics.Timeout):
		t.Fatal("metrics.Serve did not return after its context ended")
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Error("the metrics endpoint still accepts connections")
	}
}

func TestListenMetricsAddresses(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		addr string
		ok   bool
	}{
		{"127.0.0.1:0", true},
		{"unix:" + filepath.Join(dir, "m.sock"), true},
		{":9477", false},          // every interface
		{"0.0.0.0:9477", false},   // not loopback
		{"192.0.2.1:9477", false}, // not loopback
		{"localhost:9477", false}, // names are not looked up
		{"127.0.0.1", false},      // no port
		{"unix:relative.sock", false},
		{"", false},
	} {
		l, err := metrics.Listen(tc.addr)
		if (err == nil) != tc.ok {
			t.Errorf("metrics.Listen(%q): %v, want ok=%v", tc.addr, err, tc.ok)
		}
		if l != nil {
			l.Close()
		}
	}
}

func TestReason(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{&model.ConflictError{Reason: "x"}, ReasonConflict},
		{withReason(ReasonBadParams, &model.ConflictError{}), ReasonConflict},
		{&notFoundError{"params: no such file"}, ReasonNotFound},
		{withReason(ReasonBadParams, &notFoundError{"x"}), ReasonNotFound},
		{withReason(ReasonBadParams, errors.New("unknown mode")), ReasonBadParams},
		{withReason(ReasonBadParams, fmt.Errorf("read: %w", xenstore.ErrConnectionLost)), ReasonXenStore},
		{fmt.Errorf("connect: %w", hotplug.ErrBackendGone), ReasonXenStore},
		{errors.New("something"), ReasonOther},
	} {
		if got := Reason(tc.err); got != tc.want {
			t.Errorf("Reason(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
	if !errors.Is(&notFoundError{"x"}, fs.ErrNotExist) {
		t.Error("notFoundError does not match fs.ErrNotExist")
	}
	if e := withReason(ReasonLoop, errors.New("the message")); e.Error() != "the message" {
		t.Errorf("withReason changes the message: %q", e.Error())
	}
}

// sampleCount returns how many values histogram name recorded in the series
// with these label name/value pairs, gathered from d's registry.
func sampleCount(t *testing.T, d *Daemon, name string, labelPairs ...string) uint64 {
	t.Helper()
	families, err := d.metrics.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			for i := 0; i+1 < len(labelPairs); i += 2 {
				if !slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool {
					return l.GetName() == labelPairs[i] && l.GetValue() == labelPairs[i+1]
				}) {
					continue series
				}
			}
			return m.GetHistogram().GetSampleCount()
		}
	}
	t.Fatalf("no histogram %s%v", name, labelPairs)
	return 0
}

func containsLine(body, line string) bool {
	for _, l := range strings.Split(body, "\n") {
		if l == line {
			return true
		}
	}
	return false
}

// textFormat is the Content-Type of the text exposition format, before its
// optional parameters (charset, escaping).
const textFormat = "text/plain; version=0.0.4"

// checkExposition parses body as the text exposition format (the Prometheus
// server's own parser), checks every histogram's buckets are cumulative and
// end at _count, and runs `promtool check metrics` on it: no lint problem
// may be reported.
func checkExposition(t *testing.T, body string) {
	t.Helper()
	parser := expfmt.NewTextParser(prommodel.LegacyValidation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("exposition does not parse: %v\n%s", err, body)
	}
	for name, f := range families {
		if f.GetType() != dto.MetricType_HISTOGRAM {
			continue
		}
		for _, m := range f.GetMetric() {
			h := m.GetHistogram()
			last := uint64(0)
			for _, b := range h.GetBucket() {
				if b.GetCumulativeCount() < last {
					t.Errorf("%s: bucket le=%v not cumulative", name, b.GetUpperBound())
				}
				last = b.GetCumulativeCount()
			}
			if last > h.GetSampleCount() {
				t.Errorf("%s: buckets count %d, _count %d", name, last, h.GetSampleCount())
			}
		}
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		testenv.SkipPart(t, "no promtool (scripts/setup.sh installs prometheus): the exposition lint")
		return
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(body)
	if out, err := cmd.CombinedOutput(); err != nil || len(out) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}
