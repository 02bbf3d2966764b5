package daemon

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"xenblkd/internal/api"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/metrics"
	"xenblkd/internal/model"
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
	ml, err := ListenMetrics(metricsAddr)
	if err != nil {
		l.Close()
		t.Fatal(err)
	}
	serve(t,
		func(ctx context.Context) error { return e.d.Serve(ctx, l) },
		func(ctx context.Context) error { return e.d.ServeMetrics(ctx, ml) })
	return &observed{env: e, d: e.d, addr: ml.Addr().Network() + ":" + ml.Addr().String()}
}

// get sends raw to the metrics endpoint and returns the status code, headers
// and body of the reply.
func (o *observed) get(t *testing.T, raw string) (int, map[string]string, string) {
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
	r := bufio.NewReader(c)
	status, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("read status line: %v", err)
	}
	f := strings.Fields(status)
	if len(f) < 2 || f[0] != "HTTP/1.1" {
		t.Fatalf("status line %q", status)
	}
	code, _ := strconv.Atoi(f[1])
	headers := map[string]string{}
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("read headers: %v", err)
		}
		if line == "\r\n" {
			break
		}
		k, v, _ := strings.Cut(strings.TrimSuffix(line, "\r\n"), ": ")
		headers[k] = v
	}
	body, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := strconv.Atoi(headers["Content-Length"]); !strings.HasPrefix(raw, "HEAD") && n != len(body) {
		t.Errorf("Content-Length %d, body %d bytes", n, len(body))
	}
	return code, headers, string(body)
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

	code, h, body := o.get(t, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n")
	if code != 200 || h["Content-Type"] != metrics.ContentType {
		t.Fatalf("GET /metrics: %d %q\n%s", code, h["Content-Type"], body)
	}
	checkExposition(t, body)
	for _, want := range []string{
		`xenblkd_attachments{kind="file",mode="r"} 2`,
		`xenblkd_attachments{kind="file",mode="w"} 1`,
		`xenblkd_attachments{kind="block",mode="w"} 0`,
		`xenblkd_loop_devices_held 2`,
		`xenblkd_loop_devices_unused 0`,
		`xenblkd_readonly_cache_hits_total 1`,
		`xenblkd_errors_total{op="add",reason="not_found"} 1`,
		`xenblkd_errors_total{op="add",reason="conflict"} 1`,
		`xenblkd_errors_total{op="add",reason="bad_params"} 2`,
		`xenblkd_errors_total{op="add",reason="other"} 0`,
		`xenblkd_errors_total{op="remove",reason="xenstore"} 0`,
		`xenblkd_request_duration_seconds_count{op="add"} 7`,
		`xenblkd_recoveries_total{result="restored"} 0`,
	} {
		if !containsLine(body, want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}

	o.d.Metrics().CountRecovery(RecoveryRestored)
	o.d.Metrics().CountRecovery("something else")
	for _, dom := range []int{1, 2, 3} {
		o.call(t, "remove", fmt.Sprintf("backend/vbd/%d/51712", dom))
	}
	_, _, body = o.get(t, "GET /metrics?name[]=x HTTP/1.0\r\n\r\n")
	checkExposition(t, body)
	for _, want := range []string{
		`xenblkd_attachments{kind="file",mode="r"} 0`,
		`xenblkd_loop_devices_held 0`,
		`xenblkd_request_duration_seconds_count{op="remove"} 3`,
		`xenblkd_recoveries_total{result="restored"} 1`,
		`xenblkd_recoveries_total{result="failed"} 1`,
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
		{"get", "GET /metrics HTTP/1.1\r\n\r\n", 200, true},
		{"bare newlines", "GET /metrics HTTP/1.0\n\n", 200, true},
		{"head", "HEAD /metrics HTTP/1.1\r\n\r\n", 200, false},
		{"root", "GET / HTTP/1.1\r\n\r\n", 404, true},
		{"other path", "GET /metricsx HTTP/1.1\r\n\r\n", 404, true},
		{"post", "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, true},
		{"garbage", "hello\r\n\r\n", 400, true},
		{"http/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, true},
		{"headers too long", "GET /metrics HTTP/1.1\r\nX: " + strings.Repeat("a", maxMetricsHead) + "\r\n\r\n", 400, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, body := o.get(t, tc.raw)
			if code != tc.want || (body != "") != tc.body {
				t.Errorf("got %d with %d bytes of body, want %d (body %v)", code, len(body), tc.want, tc.body)
			}
		})
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
		l, err := ListenMetrics(tc.addr)
		if (err == nil) != tc.ok {
			t.Errorf("ListenMetrics(%q): %v, want ok=%v", tc.addr, err, tc.ok)
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

func FuzzParseRequestHead(f *testing.F) {
	for _, s := range []string{"GET /metrics HTTP/1.1\r\nHost: x", "GET / HTTP/1.0", "", " ", "GET  HTTP/1.1", "get /metrics HTTP/1.1"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, head []byte) {
		method, path, err := ParseRequestHead(head)
		if err != nil {
			return
		}
		if method == "" || !strings.HasPrefix(path, "/") || strings.Contains(path, "?") || strings.ContainsAny(path, " \n") {
			t.Errorf("ParseRequestHead(%q) = %q, %q", head, method, path)
		}
	})
}

func containsLine(body, line string) bool {
	for _, l := range strings.Split(body, "\n") {
		if l == line {
			return true
		}
	}
	return false
}

var (
	sampleRE = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})? (\S+)$`)
	helpRE   = regexp.MustCompile(`^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) .+$`)
	typeRE   = regexp.MustCompile(`^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram)$`)
)

// checkExposition checks body against the text exposition format 0.0.4:
// every sample belongs to the family whose HELP and TYPE precede it, each
// family appears once, values parse, histogram buckets are cumulative and
// end with +Inf equal to _count.
func checkExposition(t *testing.T, body string) {
	t.Helper()
	if !strings.HasSuffix(body, "\n") {
		t.Fatal("exposition does not end with a newline")
	}
	seen := map[string]bool{}
	family, typ := "", ""
	var lastBucket float64
	buckets := map[string]float64{} // series without le → +Inf bucket
	for i, line := range strings.Split(strings.TrimSuffix(body, "\n"), "\n") {
		if m := helpRE.FindStringSubmatch(line); m != nil {
			if seen[m[1]] {
				t.Errorf("line %d: family %s twice", i+1, m[1])
			}
			seen[m[1]], family, typ = true, m[1], ""
			continue
		}
		if m := typeRE.FindStringSubmatch(line); m != nil {
			if m[1] != family {
				t.Errorf("line %d: TYPE of %s after HELP of %s", i+1, m[1], family)
			}
			typ = m[2]
			continue
		}
		m := sampleRE.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("line %d: not a sample: %q", i+1, line)
			continue
		}
		name, labels, value := m[1], m[2], m[4]
		v, err := strconv.ParseFloat(value, 64)
		if err != nil && value != "+Inf" {
			t.Errorf("line %d: value %q", i+1, value)
		}
		switch typ {
		case "histogram":
			switch name {
			case family + "_bucket":
				series := regexp.MustCompile(`,?le="[^"]*"`).ReplaceAllString(labels, "")
				if _, ok := buckets[series]; !ok {
					lastBucket = 0
				}
				if v < lastBucket {
					t.Errorf("line %d: bucket not cumulative", i+1)
				}
				lastBucket = v
				buckets[series] = v
			case family + "_sum":
			case family + "_count":
				if buckets[labels] != v {
					t.Errorf("line %d: _count %v, +Inf bucket %v", i+1, v, buckets[labels])
				}
			default:
				t.Errorf("line %d: sample %s in histogram %s", i+1, name, family)
			}
		case "counter", "gauge":
			if name != family {
				t.Errorf("line %d: sample %s in family %s", i+1, name, family)
			}
			if typ == "counter" && (v < 0 || !strings.HasSuffix(name, "_total")) {
				t.Errorf("line %d: counter %s = %v", i+1, name, v)
			}
		default:
			t.Errorf("line %d: sample before HELP/TYPE", i+1)
		}
	}
}
