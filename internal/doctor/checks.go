package doctor

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Check names, as printed in the first column.
const (
	NameLoopControl   = "loop-control"
	NameLoopConfigure = "loop-configure"
	NameDiskSeq       = "diskseq"
	NameXenStore      = "xenstore"
	NameBlkback       = "blkback"
	NameSystemd       = "systemd"
	NameFDStore       = "fd-store"
	NameDaemon        = "daemon"
	NameStaleLoops    = "stale-loops"
)

// Kernel versions that brought what xenblkd uses.
var (
	kernelLoopConfigure = [2]int{5, 8}  // LOOP_CONFIGURE, commit 3448914e8cc5
	kernelDiskSeq       = [2]int{5, 15} // BLKGETDISKSEQ, commit 7957d93bf32b
)

func checkLoopControl(o *Options) Check {
	c := Check{Name: NameLoopControl, Severity: Required}
	st, err := os.Stat(o.LoopControl)
	if err != nil {
		c.Detail = err.Error()
		c.Fix = "load the loop driver: modprobe loop (and list it in /etc/modules)"
		return c
	}
	if st.Mode()&fs.ModeCharDevice == 0 {
		c.Detail = o.LoopControl + " is not a character device"
		c.Fix = "remove it and load the loop driver (modprobe loop); udev recreates the node"
		return c
	}
	f, err := os.OpenFile(o.LoopControl, os.O_RDWR, 0)
	if err != nil {
		c.Detail = err.Error()
		c.Fix = "run as root (xenblkd needs CAP_SYS_ADMIN for loop devices)"
		return c
	}
	f.Close()
	c.OK = true
	c.Detail = o.LoopControl + " opened read-write"
	return c
}

func checkLoopConfigure(o *Options, p LoopProbe) Check {
	c := Check{Name: NameLoopConfigure, Severity: Required}
	kernel := "kernel " + o.KernelRelease
	switch {
	case p.Err == nil:
		c.OK = true
		c.Detail = fmt.Sprintf("bound %s with one LOOP_CONFIGURE (%s)", p.Device, kernel)
	case errors.Is(p.Err, unix.EINVAL) || errors.Is(p.Err, unix.ENOTTY):
		c.Detail = fmt.Sprintf("%s rejects LOOP_CONFIGURE: %v", kernel, p.Err)
		c.Fix = "boot a kernel >= 5.8"
	default:
		c.Detail = "probe failed: " + p.Err.Error()
		if !kernelAtLeast(o.KernelRelease, kernelLoopConfigure) {
			c.Detail += "; " + kernel + " is older than 5.8, which brought LOOP_CONFIGURE"
			c.Fix = "boot a kernel >= 5.8"
		} else {
			c.Fix = "fix " + NameLoopControl + " first, or check free loop devices (losetup -l, max_loop)"
		}
	}
	return c
}

func checkDiskSeq(o *Options, p LoopProbe) Check {
	c := Check{Name: NameDiskSeq, Severity: Required}
	kernel := "kernel " + o.KernelRelease
	switch {
	case p.Err == nil && p.DiskSeqErr == nil && p.DiskSeq != 0:
		c.OK = true
		c.Detail = fmt.Sprintf("BLKGETDISKSEQ on %s = %d", p.Device, p.DiskSeq)
	case p.Err == nil:
		c.Detail = fmt.Sprintf("BLKGETDISKSEQ failed on %s (%s): %v", p.Device, kernel, p.DiskSeqErr)
		c.Fix = "boot a kernel >= 5.15: without diskseq a loop device's identity cannot be checked after a restart"
	case kernelAtLeast(o.KernelRelease, kernelDiskSeq):
		c.Detail = fmt.Sprintf("not probed (no probe device); %s should have it", kernel)
		c.Fix = "fix " + NameLoopConfigure + " first"
	default:
		c.Detail = kernel + " is older than 5.15, which brought BLKGETDISKSEQ"
		c.Fix = "boot a kernel >= 5.15"
	}
	return c
}

func checkXenStore(ctx context.Context, o *Options) Check {
	c := Check{Name: NameXenStore, Severity: Required}
	var tried []string
	for _, p := range o.XenStorePaths {
		st, err := os.Stat(p)
		if err != nil {
			tried = append(tried, err.Error())
			continue
		}
		switch {
		case st.Mode()&fs.ModeSocket != 0:
			conn, err := (&net.Dialer{Timeout: defaultDialTimeout}).DialContext(ctx, "unix", p)
			if err != nil {
				c.Detail = "connect " + p + ": " + errText(err)
				c.Fix = "start xenstored (Debian 12: systemctl start xen, the SysV script that starts it; upstream Xen: systemctl start xenstored); remove a stale socket"
				return c
			}
			conn.Close()
		case st.Mode()&fs.ModeCharDevice != 0:
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				c.Detail = "open " + p + ": " + errText(err)
				c.Fix = "run as root; in a driver domain, load xen-evtchn/xenfs so /dev/xen/xenbus works"
				return c
			}
			f.Close()
		default:
			tried = append(tried, p+": neither a socket nor a character device")
			continue
		}
		if err := o.XenStoreRead(ctx, p); err != nil {
			c.Detail = "read " + xenStoreProbeNode + " through " + p + ": " + err.Error()
			c.Fix = "xenstored accepts connections but does not answer: check its log (/var/log/xen/xenstored*)"
			return c
		}
		c.Detail = "xenstored answers on " + p
		c.OK = true
		return c
	}
	c.Detail = "no XenStore: " + strings.Join(tried, "; ")
	c.Fix = "is this a Xen dom0 or driver domain? start xenstored (Debian 12: systemctl start xen; upstream Xen: systemctl start xenstored), or set XENSTORED_PATH"
	return c
}

func checkBlkback(o *Options) Check {
	c := Check{Name: NameBlkback, Severity: Warning}
	for _, p := range []string{
		filepath.Join(o.SysModule, "xen_blkback"),
		filepath.Join(o.SysBus, "xen-backend", "drivers", "vbd"),
	} {
		if _, err := os.Stat(p); err == nil {
			c.OK = true
			c.Detail = "found " + p
			return c
		}
	}
	c.Detail = "xen-blkback is not loaded: VMs cannot use the disks xenblkd attaches"
	c.Fix = "modprobe xen-blkback (and list it in /etc/modules)"
	return c
}

func checkSystemd(o *Options) Check {
	c := Check{Name: NameSystemd, Severity: Warning}
	if st, err := os.Stat(o.SystemdDir); err == nil && st.IsDir() {
		c.OK = true
		c.Detail = "systemd is PID 1"
		return c
	}
	c.Detail = "not running under systemd (no " + o.SystemdDir + "): no fd store, so a restart of the daemon cannot recover the loop devices it held"
	c.Fix = "run xenblkd as the systemd unit " + o.Unit
	return c
}

// checkFDStore reads the unit's fd store settings from systemd. It never
// starts anything: without systemd as PID 1 it only says so.
func checkFDStore(ctx context.Context, o *Options) Check {
	c := Check{Name: NameFDStore, Severity: Warning}
	props, ok := showUnit(ctx, o, &c, "LoadState,FileDescriptorStoreMax,NFileDescriptorStore")
	if !ok {
		return c
	}
	if ls := props["LoadState"]; ls != "" && ls != "loaded" {
		c.Detail = o.Unit + " is " + ls
		c.Fix = "install the unit (make install, or the xenblkd package) and run systemctl daemon-reload"
		return c
	}
	max, err := strconv.Atoi(props["FileDescriptorStoreMax"])
	if err != nil {
		c.Severity = Info
		c.Detail = "cannot be checked: no FileDescriptorStoreMax in systemctl show output"
		return c
	}
	c.Detail = fmt.Sprintf("FileDescriptorStoreMax=%d", max)
	n, haveN := props["NFileDescriptorStore"]
	if haveN {
		c.Detail += ", NFileDescriptorStore=" + n
	}
	if max == 0 {
		c.Fix = "set FileDescriptorStoreMax= in " + o.Unit + " (the shipped unit does); without it a daemon restart loses its loop devices"
		return c
	}
	if used, err := strconv.Atoi(n); err == nil && used >= max {
		c.Detail += ": the fd store is full"
		c.Fix = "raise FileDescriptorStoreMax= with a drop-in (systemctl edit " + o.Unit + ")"
		return c
	}
	c.OK = true
	return c
}

func checkDaemon(ctx context.Context, o *Options) Check {
	c := Check{Name: NameDaemon, Severity: Required}
	conn, err := (&net.Dialer{Timeout: defaultDialTimeout}).DialContext(ctx, "unix", o.Socket)
	if err != nil {
		c.Detail = "connect " + o.Socket + ": " + errText(err)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			c.Fix = "start the daemon: systemctl enable --now " + o.Unit
		case errors.Is(err, unix.ECONNREFUSED):
			c.Fix = "the daemon is not running (stale socket): systemctl restart " + o.Unit + "; see journalctl -u " + o.Unit
		case errors.Is(err, fs.ErrPermission):
			c.Fix = "run as root"
		default:
			c.Fix = "see journalctl -u " + o.Unit
		}
		return c
	}
	conn.Close()
	c.OK = true
	c.Detail = "daemon listening on " + o.Socket
	return c
}

// TaggedLoop is a bound loop device whose lo_file_name carries our tag.
type TaggedLoop struct {
	Number  int
	Path    string // /dev/loopN
	Tag     string // lo_file_name
	Backing string // sysfs loop/backing_file
}

// ScanTagged lists bound loop devices whose tag starts with o.TagPrefix, by
// number. Devices it cannot read are skipped (they may be cleared meanwhile).
func ScanTagged(o *Options) ([]TaggedLoop, error) {
	entries, err := os.ReadDir(o.SysBlock)
	if err != nil {
		return nil, err
	}
	var found []TaggedLoop
	for _, e := range entries {
		num, ok := strings.CutPrefix(e.Name(), "loop")
		n, err := strconv.Atoi(num)
		if !ok || err != nil {
			continue
		}
		backing, err := os.ReadFile(filepath.Join(o.SysBlock, e.Name(), "loop", "backing_file"))
		if err != nil {
			continue // unbound: sysfs has no loop/backing_file
		}
		dev := filepath.Join(o.DevDir, e.Name())
		tag, err := o.LoopTag(dev)
		if err != nil || !strings.HasPrefix(tag, o.TagPrefix) {
			continue
		}
		found = append(found, TaggedLoop{Number: n, Path: dev, Tag: tag, Backing: strings.TrimSpace(string(backing))})
	}
	sort.Slice(found, func(i, j int) bool { return found[i].Number < found[j].Number })
	return found, nil
}

func checkStaleLoops(o *Options) Check {
	c := Check{Name: NameStaleLoops, Severity: Warning}
	tagged, err := ScanTagged(o)
	if err != nil {
		c.Severity = Info
		c.Detail = "cannot be checked: " + err.Error()
		return c
	}
	if len(tagged) == 0 {
		c.OK = true
		c.Detail = "no loop device tagged " + o.TagPrefix
		return c
	}
	if o.Held == nil {
		c.Severity = Info
		c.Detail = fmt.Sprintf("%d loop device(s) tagged %s; cannot tell which the daemon holds: %s", len(tagged), o.TagPrefix, describe(tagged))
		return c
	}
	held, err := o.Held()
	if err != nil {
		c.Severity = Info
		c.Detail = fmt.Sprintf("%d loop device(s) tagged %s; cannot ask the daemon which it holds (%v): %s", len(tagged), o.TagPrefix, err, describe(tagged))
		return c
	}
	var stale []TaggedLoop
	for _, t := range tagged {
		if !held[t.Number] {
			stale = append(stale, t)
		}
	}
	if len(stale) == 0 {
		c.OK = true
		c.Detail = fmt.Sprintf("%d loop device(s) tagged %s, all held by the daemon", len(tagged), o.TagPrefix)
		return c
	}
	c.Detail = fmt.Sprintf("%d loop device(s) tagged %s that the daemon does not hold: %s", len(stale), o.TagPrefix, describe(stale))
	c.Fix = "find who still opens them (xl block-list for each domain; fuser -v /dev/loopN); they clear themselves (AUTOCLEAR) once the last user closes them"
	return c
}

func describe(ts []TaggedLoop) string {
	parts := make([]string, len(ts))
	for i, t := range ts {
		parts[i] = fmt.Sprintf("%s (%s, %s)", t.Path, t.Tag, t.Backing)
	}
	return strings.Join(parts, ", ")
}

// parseProperties parses systemctl show's KEY=VALUE lines.
func parseProperties(out []byte) map[string]string {
	props := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			props[k] = v
		}
	}
	return props
}

func runSystemctl(ctx context.Context, args ...string) ([]byte, error) {
	out, err := exec.CommandContext(ctx, "systemctl", args...).Output()
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) && len(exitErr.Stderr) > 0 {
		return out, fmt.Errorf("%w: %s", err, strings.TrimSpace(string(exitErr.Stderr)))
	}
	return out, err
}

// errText drops net.OpError's repeated "dial unix <path>:" prefix.
func errText(err error) string {
	var opErr *net.OpError
	if errors.As(err, &opErr) && opErr.Err != nil {
		return opErr.Err.Error()
	}
	return err.Error()
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// kernelAtLeast reports whether release ("6.1.0-28-amd64") is at least
// want (major, minor). An unparsable release counts as new enough.
func kernelAtLeast(release string, want [2]int) bool {
	fields := strings.FieldsFunc(release, func(r rune) bool { return r < '0' || r > '9' })
	if len(fields) < 2 {
		return true
	}
	major, err1 := strconv.Atoi(fields[0])
	minor, err2 := strconv.Atoi(fields[1])
	if err1 != nil || err2 != nil {
		return true
	}
	return major > want[0] || major == want[0] && minor >= want[1]
}

// showUnit reads the unit's properties from systemd (systemctl show -p).
// Without systemd as PID 1, or when systemctl fails, c becomes an Info
// "cannot be checked" and ok is false.
func showUnit(ctx context.Context, o *Options, c *Check, properties string) (props map[string]string, ok bool) {
	if st, err := os.Stat(o.SystemdDir); err != nil || !st.IsDir() {
		c.Severity = Info
		c.Detail = "cannot be checked: systemd is not PID 1"
		return nil, false
	}
	out, err := o.Systemctl(ctx, "show", "-p", properties, o.Unit)
	if err != nil {
		c.Severity = Info
		c.Detail = "cannot be checked: systemctl show " + o.Unit + ": " + err.Error()
		return nil, false
	}
	return parseProperties(out), true
}
