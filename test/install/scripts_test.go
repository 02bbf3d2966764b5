package install

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"xenblkd/internal/testenv"
)

// stubPath makes a directory of stand-ins for deb-systemd-helper,
// deb-systemd-invoke and systemctl that log their arguments to log, so the
// maintainer scripts run without touching this host's systemd, and for
// xenblkd, whose "status --json" prints $STATUS_JSON (fails when unset: the
// daemon is not running).
func stubPath(t *testing.T, log string) string {
	t.Helper()
	dir := t.TempDir()
	// The xenblkd stub answers status from $STATUS_JSON (no daemon: exit 1)
	// and hands every other command to $XENBLKD_REAL, the package's binary.
	xenblkd := "#!/bin/sh\nif [ \"$1\" != status ]; then [ -n \"$XENBLKD_REAL\" ] && exec \"$XENBLKD_REAL\" \"$@\"; exit 1; fi\n" +
		"[ -n \"$STATUS_JSON\" ] || exit 1\n" +
		"if [ \"$*\" = \"status --json\" ]; then echo \"$STATUS_JSON\"; else echo \"DOMID NAME\"; echo \"1     guest\"; fi\n"
	if err := os.WriteFile(filepath.Join(dir, "xenblkd"), []byte(xenblkd), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"deb-systemd-helper", "deb-systemd-invoke", "systemctl"} {
		// was-enabled fails (exit 1) when $WAS_ENABLED is "no".
		stub := "#!/bin/sh\necho \"" + name + " $*\" >> " + log + "\n" +
			"case \"$*\" in *was-enabled*) [ \"$WAS_ENABLED\" != no ] ;; esac\n"
		if err := os.WriteFile(filepath.Join(dir, name), []byte(stub), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func runScript(t *testing.T, script string, env []string, args ...string) []string {
	t.Helper()
	calls, out, err := tryScript(t, script, env, args...)
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", script, args, err, out)
	}
	return calls
}

// tryScript runs a maintainer script with the stubs and returns the calls it
// made, its output and its error.
func tryScript(t *testing.T, script string, env []string, args ...string) ([]string, string, error) {
	t.Helper()
	log := filepath.Join(t.TempDir(), "calls")
	cmd := exec.Command(filepath.Join(repoRoot(t), "dist/debian", script), args...)
	cmd.Env = append([]string{"PATH=" + stubPath(t, log) + ":/usr/bin:/bin"}, env...)
	out, err := cmd.CombinedOutput()
	b, _ := os.ReadFile(log)
	return strings.Split(strings.TrimSpace(string(b)), "\n"), string(out), err
}

func contains(calls []string, want string) bool {
	for _, c := range calls {
		if c == want {
			return true
		}
	}
	return false
}

// systemdRunning: the scripts start/stop the unit only when /run/systemd/system
// exists; on a host without it those calls must not happen.
func systemdRunning() bool {
	st, err := os.Stat("/run/systemd/system")
	return err == nil && st.IsDir()
}

func TestMaintainerScripts(t *testing.T) {
	const unit, socket = "xenblkd.service", "xenblkd.socket"
	units := []string{socket, unit}
	sd := systemdRunning()

	calls := runScript(t, "postinst", nil, "configure")
	for _, u := range units {
		for _, want := range []string{"deb-systemd-helper unmask " + u, "deb-systemd-helper enable " + u} {
			if !contains(calls, want) {
				t.Errorf("postinst configure (new install): no %q in %q", want, calls)
			}
		}
		if got := contains(calls, "deb-systemd-invoke start "+u); got != sd {
			t.Errorf("postinst configure: started %s = %v, want %v (systemd running: %v): %q", u, got, sd, sd, calls)
		}
	}

	// An upgrade of a unit the administrator disabled keeps it disabled, and
	// restarts the daemon rather than starts it. The socket is only started
	// (a no-op when it runs), never restarted or stopped: connections wait in it.
	calls = runScript(t, "postinst", []string{"WAS_ENABLED=no"}, "configure", "0~git1234567")
	for _, u := range units {
		if contains(calls, "deb-systemd-helper enable "+u) || !contains(calls, "deb-systemd-helper update-state "+u) {
			t.Errorf("postinst upgrade of a disabled %s: %q, want update-state and no enable", u, calls)
		}
	}
	if got := contains(calls, "deb-systemd-invoke restart "+unit); got != sd {
		t.Errorf("postinst upgrade: restarted = %v, want %v: %q", got, sd, calls)
	}
	for _, c := range calls {
		if strings.Contains(c, socket) && (strings.Contains(c, " restart ") || strings.Contains(c, " stop ")) {
			t.Errorf("postinst upgrade: %q: the socket must keep listening", c)
		}
	}

	// prerm stops the daemon and the socket on removal only, not on upgrade.
	calls = runScript(t, "prerm", nil, "upgrade", "1.0")
	for _, u := range units {
		if contains(calls, "deb-systemd-invoke stop "+u) {
			t.Errorf("prerm upgrade stopped %s: %q", u, calls)
		}
	}
	calls = runScript(t, "prerm", nil, "remove")
	for _, u := range units {
		if got := contains(calls, "deb-systemd-invoke stop "+u); got != sd {
			t.Errorf("prerm remove: stopped %s = %v, want %v: %q", u, got, sd, calls)
		}
	}

	calls = runScript(t, "postrm", nil, "remove")
	for _, c := range calls {
		if strings.HasPrefix(c, "systemctl ") && c != "systemctl --system daemon-reload" {
			t.Errorf("postrm called %q: only deb-systemd-helper/-invoke may act on the unit", c)
		}
	}
	for _, u := range units {
		if !contains(calls, "deb-systemd-helper mask "+u) {
			t.Errorf("postrm remove: %q, want mask of %s", calls, u)
		}
	}
	calls = runScript(t, "postrm", nil, "purge")
	for _, u := range units {
		if !contains(calls, "deb-systemd-helper purge "+u) || !contains(calls, "deb-systemd-helper unmask "+u) {
			t.Errorf("postrm purge: %q, want purge and unmask of %s", calls, u)
		}
	}
}

// TestPrermInUse: removal while the daemon reports attachments is refused
// (exit 1, nothing stopped) unless XENBLKD_FORCE_REMOVE=1; an upgrade, a
// daemon with no attachments or a daemon that does not answer goes ahead.
func TestPrermInUse(t *testing.T) {
	const inUse = `{"attachments": [{"domid": 1, "domain_name": "guest", "devid": 51712}], "unused_loop_devices": []}`
	const idle = `{"attachments": [], "unused_loop_devices": []}`
	stop := "deb-systemd-invoke stop xenblkd.service"
	for _, c := range []struct {
		name     string
		env      []string
		args     []string
		wantFail bool
		wantOut  string
	}{
		{"in use", []string{"STATUS_JSON=" + inUse}, []string{"remove"}, true, "refusing to remove xenblkd"},
		{"in use, forced", []string{"STATUS_JSON=" + inUse, "XENBLKD_FORCE_REMOVE=1"}, []string{"remove"}, false, "warning: removing xenblkd while VMs use"},
		{"in use, upgrade", []string{"STATUS_JSON=" + inUse}, []string{"upgrade", "0.2.0"}, false, ""},
		{"idle", []string{"STATUS_JSON=" + idle}, []string{"remove"}, false, ""},
		{"daemon down", nil, []string{"remove"}, false, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			calls, out, err := tryScript(t, "prerm", c.env, c.args...)
			if (err != nil) != c.wantFail {
				t.Fatalf("prerm %v: err %v, want failure %v\n%s", c.args, err, c.wantFail, out)
			}
			if !strings.Contains(out, c.wantOut) {
				t.Errorf("prerm %v said %q, want %q", c.args, out, c.wantOut)
			}
			if c.wantFail && strings.Contains(out, "guest") != true {
				t.Errorf("prerm %v does not list the VMs' disks: %q", c.args, out)
			}
			if c.wantFail && contains(calls, stop) {
				t.Errorf("refused prerm stopped the unit: %q", calls)
			}
		})
	}
}

// TestManPage renders docs/xenblkd.8 with man's warnings on and checks that it
// documents every command the binary has.
func TestManPage(t *testing.T) {
	if _, err := exec.LookPath("man"); err != nil {
		testenv.Skip(t, "no man (scripts/setup.sh installs man-db)")
	}
	page := filepath.Join(repoRoot(t), "docs/xenblkd.8")
	cmd := exec.Command("man", "--warnings", "-l", page)
	cmd.Env = append(os.Environ(), "MANWIDTH=80", "LC_ALL=C.UTF-8", "MANPAGER=cat", "PAGER=cat")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil || stderr.Len() != 0 {
		t.Fatalf("man --warnings -l %s: %v\n%s", page, err, stderr.String())
	}
	// Drop grotty's overstrike (bold "x\bx", underline "_\bx") and Unicode hyphens.
	text := regexp.MustCompile(".\b").ReplaceAllString(string(out), "")
	text = strings.NewReplacer("\u2010", "-", "\u2212", "-", "\u2018", "'", "\u2019", "'").Replace(text)
	for _, want := range []string{
		"xenblkd daemon", "add|remove", "xenblkd status [--json]", "xenblkd doctor [--json]", "xenblkd version",
		"XENBLKD_SOCKET", "XENSTORED_PATH", "XENBUS_PATH", "/run/xenblkd/api.sock", "/etc/xen/scripts/xenblkd",
		"xenblkd.service", "script=xenblkd", "<script path='/etc/xen/scripts/xenblkd'/>", "EXIT STATUS", "SEE ALSO",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("rendered man page lacks %q", want)
		}
	}
}
