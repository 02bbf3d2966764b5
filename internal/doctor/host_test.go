package doctor

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"xenblkd/internal/api"
)

func TestHypervisor(t *testing.T) {
	o := fakeOptions(t)
	want(t, checkHypervisor(o), true, Required, "running on Xen")
	os.WriteFile(o.SysHypervisor, []byte("s390\n"), 0o644)
	want(t, checkHypervisor(o), false, Required, `"s390", not xen`)
	os.Remove(o.SysHypervisor)
	want(t, checkHypervisor(o), false, Required, "not running on the Xen hypervisor")
}

func TestScriptLink(t *testing.T) {
	o := fakeOptions(t)
	want(t, checkScriptLink(o), true, Required, "-> ")
	target, _ := filepath.EvalSymlinks(o.ScriptLink)
	os.Chmod(target, 0o644)
	want(t, checkScriptLink(o), false, Required, "not an executable file")
	os.Remove(target)
	want(t, checkScriptLink(o), false, Required, "no such file")
	// The C entry: an executable file, not a symlink.
	os.Remove(o.ScriptLink)
	os.WriteFile(o.ScriptLink, []byte("\x7fELF"), 0o755)
	want(t, checkScriptLink(o), true, Required, "an executable file (the C hotplug entry)")
	os.Chmod(o.ScriptLink, 0o644)
	want(t, checkScriptLink(o), false, Required, o.ScriptLink+": not an executable file")
}

func TestUnitFlags(t *testing.T) {
	ctx := context.Background()
	o := fakeOptions(t)
	want(t, checkUnitFlags(ctx, o), false, Info, "systemd is not PID 1")
	mkdir(t, o.SystemdDir)
	exec := func(argv string) string {
		return "ExecStart={ path=/usr/sbin/xenblkd ; argv[]=" + argv + " ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }\n"
	}
	o.Socket = api.DefaultSocket
	tests := []struct {
		name   string
		out    string
		ok     bool
		sev    Severity
		detail string
	}{
		{"shipped unit", "LoadState=loaded\nPrivateNetwork=yes\nNeedDaemonReload=no\n" + exec("/usr/sbin/xenblkd daemon --metrics-listen unix:/run/xenblkd/metrics.sock"), true, Warning, "ExecStart=/usr/sbin/xenblkd daemon --metrics-listen unix:/run/xenblkd/metrics.sock"},
		{"tcp metrics with the drop-in", "LoadState=loaded\nPrivateNetwork=no\n" + exec("/usr/sbin/xenblkd daemon --metrics-listen 127.0.0.1:9477"), true, Warning, "127.0.0.1:9477"},
		{"tcp metrics in a private network", "LoadState=loaded\nPrivateNetwork=yes\n" + exec("/usr/sbin/xenblkd daemon --metrics-listen=127.0.0.1:9477"), false, Warning, "unreachable: the unit has PrivateNetwork=yes"},
		{"other socket", "LoadState=loaded\n" + exec("/usr/sbin/xenblkd daemon --socket /run/x.sock"), false, Required, "serves on /run/x.sock but the hotplug entry libxl execs uses /run/xenblkd/api.sock"},
		{"other tag", "LoadState=loaded\n" + exec("/usr/sbin/xenblkd daemon --presetup --tag mine:"), false, Warning, "--tag mine: differs"},
		{"stale unit", "LoadState=loaded\nNeedDaemonReload=yes\n" + exec("/usr/sbin/xenblkd daemon"), false, Warning, "changed on disk"},
		{"not installed", "LoadState=not-found\nExecStart=\n", false, Info, "not loaded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o.Systemctl = func(context.Context, ...string) ([]byte, error) { return []byte(tt.out), nil }
			want(t, checkUnitFlags(ctx, o), tt.ok, tt.sev, tt.detail)
		})
	}
}
