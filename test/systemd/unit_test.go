package systemd_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"xenblkd/internal/fdstore"
	"xenblkd/test/systemd"
)

// TestProductionUnit boots dist/xenblkd.service, with fdsvc standing in for
// the daemon, to show that its hardening still allows loop devices and the
// fd store, and runs `systemd-analyze verify` on it inside the sandbox.
func TestProductionUnit(t *testing.T) {
	unit, err := os.ReadFile("../../dist/xenblkd.service")
	if err != nil {
		t.Fatal(err)
	}
	bin, data, image, events := prepareFdsvc(t)
	var attached []string
	t.Cleanup(func() { // after the sandbox's teardown
		for _, name := range attached {
			number, diskseq, _ := fdstore.ParseLoopName(name)
			waitCleared(t, number, diskseq)
		}
	})

	execStart := regexp.MustCompile(`(?m)^ExecStart=/usr/sbin/xenblkd daemon.*\n`)
	if !execStart.Match(unit) || !strings.Contains(string(unit), "[Unit]\n") {
		t.Fatalf("dist/xenblkd.service has no %q or no [Unit]", execStart)
	}
	// In the sandbox only: no default dependencies (sysinit.target would run
	// tmpfiles, udev, ...), no Xen condition (TestProductionUnitDaemon tests
	// it) and no watchdog (fdsvc does not feed it), the stand-in binary,
	// logs to a shared file.
	sandboxed := strings.Replace(string(unit), "[Unit]\n", "[Unit]\nDefaultDependencies=no\n", 1)
	sandboxed = regexp.MustCompile(`(?m)^(ConditionPathExists|WatchdogSec)=.*\n`).ReplaceAllString(sandboxed, "")
	sandboxed = execStart.ReplaceAllLiteralString(sandboxed, fmt.Sprintf(
		"ExecStart=%s/fdsvc %s %s\nStandardOutput=append:%s/svc.log\nStandardError=append:%s/svc.log\n",
		bin, image, events, data, data))

	// dist/xenblkd.socket (xenblkd.service requires it), on a socket in the
	// shared directory.
	socketUnit, err := os.ReadFile("../../dist/xenblkd.socket")
	if err != nil {
		t.Fatal(err)
	}
	const listen = "ListenStream=/run/xenblkd/api.sock\n"
	if !strings.Contains(string(socketUnit), listen) {
		t.Fatalf("dist/xenblkd.socket has no %q", listen)
	}
	sandboxedSocket := strings.Replace(strings.Replace(string(socketUnit), listen, "ListenStream="+data+"/api.sock\n", 1),
		"[Unit]\n", "[Unit]\nDefaultDependencies=no\n", 1)

	sbx := systemd.Start(t, systemd.Options{
		Units: map[string]string{
			"xenblkd-test.target": "[Unit]\nDefaultDependencies=no\nWants=xenblkd.service\n",
			"xenblkd.service":     sandboxed,
			"xenblkd.socket":      sandboxedSocket,
		},
		Target: "xenblkd-test.target",
		Binds:  []systemd.Bind{{Path: bin, ReadOnly: true}, {Path: data}},
	})
	svc := &service{t: t, sbx: sbx, events: events, unit: "xenblkd.service"}
	if got := svc.waitEvent(svc.mainPID(), "socket"); got != "api" {
		t.Errorf("the service got the socket as %q, want api (FileDescriptorName=)", got)
	}
	if fi, err := os.Stat(filepath.Join(data, "api.sock")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket: %v, mode %v; want 0600", err, fi.Mode())
	}
	name := svc.waitEvent(svc.mainPID(), "attached")
	attached = append(attached, name)
	svc.wantStored(1)
	if max := svc.show("FileDescriptorStoreMax"); max != "16384" {
		t.Errorf("FileDescriptorStoreMax = %s, want 16384", max)
	}
	svc.systemctl("restart", "xenblkd.service")
	svc.wantReceived(svc.mainPID(), name)
	if got := svc.waitEvent(svc.mainPID(), "socket"); got != "api" {
		t.Errorf("after restart the service got the socket as %q, want api", got)
	}

	// verify needs ExecStart to exist: the overlay root is writable, so the
	// stand-in is copied to /usr/sbin/xenblkd in the sandbox only.
	dir := filepath.Join(data, "verify")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "xenblkd.service"), unit, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "xenblkd.socket"), socketUnit, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := sbx.Exec("cp", filepath.Join(bin, "fdsvc"), "/usr/sbin/xenblkd"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	// Documentation=man:xenblkd(8): verify checks the page exists, so install
	// ours (in the sandbox's overlay only).
	page, err := os.ReadFile("../../docs/xenblkd.8")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "xenblkd.8"), page, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := sbx.Exec("install", "-D", "-m", "0644", filepath.Join(dir, "xenblkd.8"), "/usr/share/man/man8/xenblkd.8"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	out, err := sbx.Exec("systemd-analyze", "verify", filepath.Join(dir, "xenblkd.service"), filepath.Join(dir, "xenblkd.socket"))
	version, _ := sbx.Exec("systemctl", "--version")
	version = strings.SplitN(version, "\n", 2)[0]
	t.Logf("%s: systemd-analyze verify dist/xenblkd.service dist/xenblkd.socket:\n%s", version, out)
	if err != nil {
		t.Errorf("systemd-analyze verify: %v", err)
	}
	// FileDescriptorStorePreserve= is systemd >= 254's: 252 logs that it
	// ignores it, and nothing else; newer ones say nothing.
	old := strings.HasPrefix(version, "systemd 252 ")
	unknownKey := 0
	for _, line := range strings.Split(out, "\n") {
		if !strings.Contains(line, "xenblkd.service") && !strings.Contains(line, "xenblkd.socket") || strings.Contains(line, "Documentation") {
			continue
		}
		if old && strings.Contains(line, "Unknown key 'FileDescriptorStorePreserve' in section [Service], ignoring") {
			unknownKey++
			continue
		}
		t.Errorf("systemd-analyze verify complains about the unit: %s", line)
	}
	if old && unknownKey != 1 {
		t.Errorf("systemd 252: verify said %d times that it ignores FileDescriptorStorePreserve=, want once:\n%s", unknownKey, out)
	}
}

// TestUnitSecurityScore: `systemd-analyze security` rates dist/xenblkd.service
// at most 2.0 (an offline analysis of the file: no sandbox needed).
func TestUnitSecurityScore(t *testing.T) {
	out, err := exec.Command("systemd-analyze", "security", "--offline=true", "--no-pager", "../../dist/xenblkd.service").CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for xenblkd\.service: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no overall exposure level in:\n%s", out)
	}
	score, err := strconv.ParseFloat(string(m[1]), 64)
	t.Logf("systemd-analyze security: exposure %s", m[1])
	if err != nil || score > 2.0 {
		t.Errorf("exposure level %s, want <= 2.0:\n%s", m[1], out)
	}
}
