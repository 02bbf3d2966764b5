package doctor

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"xenblkd/internal/api"
)

// Check names of host.go.
const (
	NameHypervisor = "hypervisor"
	NameScriptLink = "script-link"
	NameUnitFlags  = "unit-flags"
)

// Default paths of host.go.
const (
	DefaultSysHypervisor = "/sys/hypervisor/type"
	tcpMetricsDropIn     = "/usr/share/doc/xenblkd/examples/metrics-tcp.conf"
)

// checkHypervisor: xen-blkback and XenStore exist only under Xen; a dom0
// and a driver domain both read "xen" here.
func checkHypervisor(o *Options) Check {
	c := Check{Name: NameHypervisor, Severity: Required}
	b, err := os.ReadFile(o.SysHypervisor)
	if err != nil {
		c.Detail = "not running on the Xen hypervisor (" + err.Error() + ")"
		c.Fix = "boot Xen: on Debian, apt install xen-system-amd64 and pick the Xen entry in GRUB"
		return c
	}
	if t := strings.TrimSpace(string(b)); t != "xen" {
		c.Detail = fmt.Sprintf("%s is %q, not xen", o.SysHypervisor, t)
		c.Fix = "run xenblkd in a Xen dom0 or driver domain"
		return c
	}
	c.OK = true
	c.Detail = "running on Xen"
	return c
}

// checkScriptLink: libxl execs /etc/xen/scripts/<script> for script=xenblkd:
// the C entry installed there (make install, the package) or a symlink to
// the Go binary. Either way an executable regular file.
func checkScriptLink(o *Options) Check {
	c := Check{Name: NameScriptLink, Severity: Required}
	fix := "install -m 0755 bin/xenblkd-hotplug " + o.ScriptLink + " (make install and the package do), or ln -sf /usr/sbin/xenblkd " + o.ScriptLink
	target, err := filepath.EvalSymlinks(o.ScriptLink)
	if err != nil {
		c.Detail = err.Error()
		c.Fix = fix
		return c
	}
	detail := o.ScriptLink
	if target != o.ScriptLink {
		detail += " -> " + target
	}
	st, err := os.Stat(target)
	if err != nil || !st.Mode().IsRegular() || st.Mode().Perm()&0o111 == 0 {
		c.Detail = detail + ": not an executable file"
		c.Fix = fix
		return c
	}
	c.OK = true
	c.Detail = detail
	if target == o.ScriptLink {
		c.Detail += ": an executable file (the C hotplug entry)"
	}
	return c
}

// checkUnitFlags compares the loaded unit's ExecStart= with what the rest of
// the host expects: the hotplug entry's socket, doctor's tag, a metrics
// address the unit's sandbox lets through, a unit file systemd has loaded.
func checkUnitFlags(ctx context.Context, o *Options) Check {
	c := Check{Name: NameUnitFlags, Severity: Warning}
	props, ok := showUnit(ctx, o, &c, "LoadState,ExecStart,PrivateNetwork,NeedDaemonReload")
	if !ok {
		return c
	}
	argv := execArgv(props["ExecStart"])
	if props["LoadState"] != "loaded" || len(argv) == 0 {
		c.Severity = Info
		c.Detail = "cannot be checked: " + o.Unit + " is not loaded or has no ExecStart="
		return c
	}
	flags := daemonFlags(argv)
	var problems, fixes []string
	socket := flags["socket"]
	if socket == "" {
		socket = api.DefaultSocket
	}
	if socket != o.Socket {
		c.Severity = Required
		problems = append(problems, "the unit serves on "+socket+" but the hotplug entry libxl execs uses "+o.Socket)
		fixes = append(fixes, "drop --socket from ExecStart= (libxl passes no XENBLKD_SOCKET to the script)")
	}
	if tag, ok := flags["tag"]; ok && tag != o.TagPrefix {
		problems = append(problems, "--tag "+tag+" differs from "+o.TagPrefix)
		fixes = append(fixes, "drop --tag from ExecStart= (doctor and the docs assume "+o.TagPrefix+")")
	}
	if addr := flags["metrics-listen"]; addr != "" && props["PrivateNetwork"] == "yes" {
		if _, err := netip.ParseAddrPort(addr); err == nil {
			problems = append(problems, "--metrics-listen "+addr+" is unreachable: the unit has PrivateNetwork=yes")
			fixes = append(fixes, "install the drop-in "+tcpMetricsDropIn+" in /etc/systemd/system/"+o.Unit+".d/, or use unix:/run/xenblkd/metrics.sock")
		}
	}
	if props["NeedDaemonReload"] == "yes" {
		problems = append(problems, "the unit file changed on disk since systemd loaded it")
		fixes = append(fixes, "systemctl daemon-reload && systemctl restart "+o.Unit)
	}
	if len(problems) > 0 {
		c.Detail = strings.Join(problems, "; ")
		c.Fix = strings.Join(fixes, "; ")
		return c
	}
	c.OK = true
	c.Detail = "ExecStart=" + strings.Join(argv, " ")
	return c
}

// execArgv extracts argv from systemctl show's ExecStart value,
// "{ path=... ; argv[]=/usr/sbin/xenblkd daemon ... ; ignore_errors=no ; ... }".
func execArgv(v string) []string {
	_, rest, ok := strings.Cut(v, "argv[]=")
	if !ok {
		return nil
	}
	args, _, _ := strings.Cut(rest, " ;")
	return strings.Fields(args)
}

// daemonFlags maps the flags after "daemon" in argv ("--name value" or
// "--name=value", one or two dashes) to their values.
func daemonFlags(argv []string) map[string]string {
	flags := map[string]string{}
	for i := 0; i < len(argv); i++ {
		a := argv[i]
		if !strings.HasPrefix(a, "-") {
			continue
		}
		name := strings.TrimLeft(a, "-")
		if k, v, ok := strings.Cut(name, "="); ok {
			flags[k] = v
			continue
		}
		if name == "presetup" { // a boolean: no separate value
			flags[name] = "true"
			continue
		}
		if i+1 < len(argv) {
			flags[name] = argv[i+1]
			i++
		}
	}
	return flags
}
