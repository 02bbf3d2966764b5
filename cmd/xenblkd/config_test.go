package main_test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// exitConfig is the daemon's status for a configuration error (main.go).
const exitConfig = 78

// TestConfigErrors: every configuration error of the daemon exits with
// exitConfig (the unit's RestartPreventExitStatus=), says what is wrong in
// one line and prints nothing on stdout; the operator commands' bad flags get
// one line and a hint too.
func TestConfigErrors(t *testing.T) {
	unsafe := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(unsafe, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(unsafe, 0o777); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "api.sock")
	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"unknown flag", []string{"daemon", "--bogus"}, exitConfig, "xenblkd daemon: flag provided but not defined: -bogus (see xenblkd daemon --help)"},
		{"bad value", []string{"daemon", "--presetup=maybe"}, exitConfig, "invalid boolean value"},
		{"argument", []string{"daemon", "now"}, exitConfig, `unexpected argument "now" (see xenblkd daemon --help)`},
		{"metrics not loopback", []string{"daemon", "--socket", sock, "--metrics-listen", "192.0.2.1:9477"}, exitConfig, "not a loopback address"},
		{"metrics malformed", []string{"daemon", "--socket", sock, "--metrics-listen", "localhost"}, exitConfig, "want IP:port on loopback"},
		{"unsafe socket dir", []string{"daemon", "--socket", filepath.Join(unsafe, "api.sock")}, exitConfig, "is writable by non-root users (mode 0777)"},
		{"status flag", []string{"status", "--bogus"}, 2, "xenblkd status: flag provided but not defined: -bogus (see xenblkd status --help)"},
		{"doctor flag", []string{"doctor", "--bogus"}, 2, "xenblkd doctor: flag provided but not defined: -bogus (see xenblkd doctor --help)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cmd := exec.Command(binary, tt.args...)
			cmd.Env = append(os.Environ(), "XENSTORED_PATH="+xsd.Socket, "XENBLKD_SOCKET="+sock)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			done := make(chan error, 1)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			go func() { done <- cmd.Wait() }()
			var err error
			select {
			case err = <-done:
			case <-time.After(30 * time.Second):
				cmd.Process.Kill()
				t.Fatalf("xenblkd %v still runs after 30 s: a configuration error must exit", tt.args)
			}
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != tt.wantCode {
				t.Errorf("xenblkd %v: %v, want exit status %d", tt.args, err, tt.wantCode)
			}
			if !strings.Contains(stderr.String(), tt.wantErr) {
				t.Errorf("stderr %q lacks %q", stderr.String(), tt.wantErr)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout not empty on a configuration error: %q", stdout.String())
			}
			if strings.HasPrefix(tt.args[1], "--bogus") && strings.Count(strings.TrimSpace(stderr.String()), "\n") != 0 {
				t.Errorf("a bad flag printed more than one line:\n%s", stderr.String())
			}
		})
	}
	// --help is no error: the man-page style usage, on stdout.
	for _, c := range []string{"daemon", "status", "doctor"} {
		out, err := exec.Command(binary, c, "--help").Output()
		if err != nil || !strings.HasPrefix(string(out), "NAME\n    xenblkd "+c) {
			t.Errorf("xenblkd %s --help: %v\n%s", c, err, out)
		}
	}
}
