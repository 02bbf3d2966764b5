package main_test

// Operator commands against the built binary: status (table and --json),
// the metrics endpoint of a running daemon (curl and a raw TCP client),
// doctor's wiring, and the journald-friendly log format.

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"xenblkd/internal/testenv"
	"xenblkd/test/xenstored"
)

func TestStatusCommand(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	rw, _ := image(t, "status-rw.img")
	ro, _ := image(t, "status-ro.img")
	mustHotplug(t, d, "add", vbdSetup(t, 300, 51712, rw, "w"))
	mustHotplug(t, d, "add", vbdSetup(t, 301, 51712, ro, "r"))
	mustHotplug(t, d, "add", vbdSetup(t, 302, 51712, ro, "r"))
	t.Cleanup(func() {
		for _, dom := range []int{300, 301, 302} {
			hotplug(t, d, "remove", bePath(dom, 51712))
		}
	})

	out, err := exec.Command(binary, "status", "--socket", d.socket).CombinedOutput()
	if err != nil {
		t.Fatalf("status: %v\n%s", err, out)
	}
	text := string(out)
	for _, want := range []string{"DOMID  NAME", "SINCE", "guest300", "xvda", rw, ro, "Loop devices held for no backend: none."} {
		if !strings.Contains(text, want) {
			t.Errorf("status lacks %q:\n%s", want, text)
		}
	}
	if !regexp.MustCompile(`(?m)^301 +guest301 +xvda +\S+ +r +/dev/loop\d+ +\d+ +(direct|buffered)/512 +2 +\d{4}-\d\d-\d\d `).MatchString(text) {
		t.Errorf("no row for domain 301 with 2 users:\n%s", text)
	}

	out, err = exec.Command(binary, "status", "--json", "--socket", d.socket).Output()
	if err != nil {
		t.Fatalf("status --json: %v", err)
	}
	var doc map[string][]map[string]any
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if len(doc["attachments"]) != 3 || doc["unused_loop_devices"] == nil || len(doc["unused_loop_devices"]) != 0 {
		t.Fatalf("status --json:\n%s", out)
	}
	// The documented field names (statusUsage, docs/usage.md) and no others.
	wantKeys := []string{"block_size", "device", "devid", "diskseq", "domain_name", "domid", "io", "kind", "mode", "physical_device", "since", "target", "users", "vdev"}
	for _, a := range doc["attachments"] {
		keys := make([]string, 0, len(a))
		for k := range a {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		if !slices.Equal(keys, wantKeys) {
			t.Errorf("attachment fields %v, want %v", keys, wantKeys)
		}
	}
	if code := exitCode(exec.Command(binary, "status", "--socket", filepath.Join(t.TempDir(), "none")).Run()); code != 1 {
		t.Errorf("status without a daemon: exit %d, want 1", code)
	}
	if code := exitCode(exec.Command(binary, "status", "extra").Run()); code != 2 {
		t.Errorf("status with an argument: exit %d, want 2", code)
	}
}

func TestMetricsOverUnixSocketWithCurl(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		testenv.Skip(t, "no curl (scripts/setup.sh installs it)")
	}
	sock := filepath.Join(t.TempDir(), "metrics.sock")
	d := startDaemon(t, xsd.Socket, "--metrics-listen", "unix:"+sock)
	ro, _ := image(t, "metrics-ro.img")
	mustHotplug(t, d, "add", vbdSetup(t, 310, 51712, ro, "r"))
	mustHotplug(t, d, "add", vbdSetup(t, 311, 51712, ro, "r"))
	if _, code := hotplug(t, d, "add", vbdSetup(t, 312, 51712, "/nonexistent.img", "r")); code == 0 {
		t.Fatal("add of a missing image succeeded")
	}
	t.Cleanup(func() {
		hotplug(t, d, "remove", bePath(310, 51712))
		hotplug(t, d, "remove", bePath(311, 51712))
	})
	out, err := exec.Command(curl, "-sS", "-i", "--unix-socket", sock, "http://localhost/metrics").Output()
	if err != nil {
		t.Fatalf("curl: %v\n%s", err, out)
	}
	text := strings.ReplaceAll(string(out), "\r\n", "\n")
	for _, want := range []string{
		"HTTP/1.1 200 OK\n", "Content-Type: text/plain; version=0.0.4; charset=utf-8",
		"\nxenblkd_attachments{kind=\"file\",mode=\"r\"} 2\n",
		"\nxenblkd_loop_devices_held 1\n",
		"\nxenblkd_readonly_cache_hits_total 1\n",
		"\nxenblkd_errors_total{op=\"add\",reason=\"not_found\"} 1\n",
		"\nxenblkd_request_duration_seconds_count{op=\"add\"} 3\n",
		"\nxenblkd_build_info{goversion=\"go1.", "version=\"dev\"} 1\n", // test/build sets no main.version
		"\nprocess_resident_memory_bytes ", "\ngo_goroutines ",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("curl output lacks %q:\n%s", want, text)
		}
	}
	// The real daemon's whole output, Go and process collectors included,
	// passes the Prometheus server's own lint.
	if promtool, err := exec.LookPath("promtool"); err == nil {
		_, body, _ := strings.Cut(text, "\n\n")
		lint := exec.Command(promtool, "check", "metrics")
		lint.Stdin = strings.NewReader(body)
		if out, err := lint.CombinedOutput(); err != nil || len(out) > 0 {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	} else {
		testenv.SkipPart(t, "no promtool (scripts/setup.sh installs prometheus): the metrics lint")
	}
	out, _ = exec.Command(curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", sock, "http://localhost/").Output()
	if string(out) != "404" {
		t.Errorf("GET /: %s, want 404", out)
	}
}

func TestMetricsOverTCP(t *testing.T) {
	d := startDaemon(t, xsd.Socket, "--metrics-listen", "127.0.0.1:0")
	// The daemon logs the address it bound before it says READY=1, but the
	// line reaches the test through a pipe: wait for it (logged).
	d.logged(`msg="serving metrics" addr=127.0.0.1:`)
	m := regexp.MustCompile(`msg="serving metrics" addr=(127\.0\.0\.1:\d+)`).FindStringSubmatch(d.logText())
	if m == nil {
		t.Fatalf("no metrics address in the log:\n%s", d.logText())
	}
	// Two scrapes on one kept-alive connection, as Prometheus scrapes.
	client := &http.Client{Timeout: 10 * time.Second}
	for i := range 2 {
		resp, err := client.Get("http://" + m[1] + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		reply, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 200 || !strings.Contains(string(reply), "\nxenblkd_loop_devices_held 0\n") {
			t.Errorf("scrape %d: %s\n%s", i, resp.Status, reply)
		}
	}
}

// TestMetricsListenRefused: a refused address is a configuration error.
func TestMetricsListenRefused(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:9477", ":9477", "localhost:9477"} {
		cmd := exec.Command(binary, "daemon", "--socket", filepath.Join(t.TempDir(), "api.sock"), "--tag", tag, "--metrics-listen", addr)
		cmd.Env = []string{"XENSTORED_PATH=" + xsd.Socket}
		out, err := cmd.CombinedOutput()
		if exitCode(err) != exitConfig || !strings.Contains(string(out), "cannot serve metrics") {
			t.Errorf("--metrics-listen %s: %v\n%s", addr, err, out)
		}
	}
}

func TestDoctorWired(t *testing.T) {
	out, err := exec.Command(binary, "doctor", "--help").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "xenblkd doctor") {
		t.Errorf("doctor --help: %v\n%s", err, out)
	}
	out, _ = exec.Command(binary, "--help").Output()
	if !strings.Contains(string(out), "xenblkd doctor [--json]") {
		t.Errorf("xenblkd --help does not list doctor:\n%s", out)
	}
	if code := exitCode(exec.Command(binary, "doctor", "--no-such-flag").Run()); code != 2 {
		t.Errorf("doctor with a bad flag: exit %d, want 2", code)
	}
}

// TestJournalLogFormat: under systemd (JOURNAL_STREAM names stderr) the log
// lines carry no timestamp; elsewhere they do. Both keep level= as text.
func TestJournalLogFormat(t *testing.T) {
	for _, journal := range []bool{true, false} {
		f, err := os.CreateTemp(t.TempDir(), "stderr")
		if err != nil {
			t.Fatal(err)
		}
		var st syscall.Stat_t
		if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(binary, "daemon", "--socket", filepath.Join(t.TempDir(), "api.sock"), "--tag", tag)
		cmd.Env = []string{"XENSTORED_PATH=" + filepath.Join(t.TempDir(), "no-xenstored")}
		if journal {
			cmd.Env = append(cmd.Env, fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino))
		} else {
			cmd.Env = append(cmd.Env, "JOURNAL_STREAM=1:1") // set, but not this stderr
		}
		cmd.Stderr = f
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// It waits for xenstored (up to 20 s); SIGTERM ends the wait.
		waitLog(t, f.Name(), "waiting for XenStore")
		cmd.Process.Signal(syscall.SIGTERM)
		if code := exitCode(cmd.Wait()); code != 1 {
			t.Errorf("daemon without xenstored: exit %d, want 1", code)
		}
		f.Close()
		log, _ := os.ReadFile(f.Name())
		line := string(log)
		if !strings.Contains(line, "level=ERROR") || !strings.Contains(line, "cannot reach XenStore") {
			t.Errorf("journal=%v: log %q", journal, line)
		}
		if hasTime := strings.HasPrefix(line, "time="); hasTime == journal {
			t.Errorf("journal=%v: log %q (timestamp shown: %v)", journal, line, hasTime)
		}
	}
}

// waitLog waits until the file at path contains want.
func waitLog(t *testing.T, path, want string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q in %s:\n%s", want, path, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestDaemonWaitsForXenstored: a daemon started before xenstored (at boot,
// or while it restarts) waits for it instead of exiting at once.
func TestDaemonWaitsForXenstored(t *testing.T) {
	late := xenstored.Start(t, xenstored.C)
	if err := late.Kill(); err != nil {
		t.Fatal(err)
	}
	d := &daemon{socket: filepath.Join(t.TempDir(), "api.sock")}
	cmd := exec.Command(binary, "daemon", "--socket", d.socket, "--tag", tag)
	cmd.Env = []string{"XENSTORED_PATH=" + late.Socket}
	logPath := filepath.Join(t.TempDir(), "log")
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGTERM); cmd.Wait() })
	waitLog(t, logPath, "waiting for XenStore")
	if err := late.Restart(); err != nil {
		t.Fatal(err)
	}
	waitLog(t, logPath, `msg=serving `)
	// The line names the transport it dialled (in a driver domain /dev/xen/xenbus).
	waitLog(t, logPath, "xenstore="+late.Socket+" ")
}

func exitCode(err error) int {
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// logText returns what the daemon logged so far.
func (d *daemon) logText() string {
	d.logw.mu.Lock()
	defer d.logw.mu.Unlock()
	return d.log.String()
}

// logged reports whether the daemon logs want within 10 s. Its output reaches
// the test through a pipe, so a line the daemon wrote before answering a
// request may not be in logText yet when the request returns.
func (d *daemon) logged(want string) bool {
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if strings.Contains(d.logText(), want) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// TestDaemonRejectsBadDirectIO: a bad --direct-io is a usage error, before
// the daemon touches XenStore or the socket.
func TestDaemonRejectsBadDirectIO(t *testing.T) {
	cmd := exec.Command(binary, "daemon", "--direct-io=yes", "--socket", filepath.Join(t.TempDir(), "api.sock"))
	out, err := cmd.CombinedOutput()
	if code := exitCode(err); code != 78 || !strings.Contains(string(out), `--direct-io: direct I/O setting "yes": expected auto, on or off`) {
		t.Errorf("exit %d, output %q; want 78 (a configuration error) and the setting named", code, out)
	}
}
