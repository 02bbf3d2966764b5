// Package doctor checks what this host offers xenblkd (loop API, diskseq,
// XenStore, blkback, systemd's fd store and unit, the daemon, the hotplug
// script link) and says what to fix.
//
// Every check reads only the paths and hooks in Options, so tests can point
// them at temporary directories. Doctor never changes the host, with one
// exception: the LOOP_CONFIGURE probe binds a loop device to a 4 KiB temporary
// file, read-only and AUTOCLEAR, and releases it before Run returns.
package doctor

import (
	"context"
	"os"
	"time"

	"xenblkd/internal/api"
)

// Severity says what a failed check means for the host.
type Severity string

const (
	// Required: xenblkd cannot attach disks until this is fixed.
	Required Severity = "required"
	// Warning: xenblkd works, but less safely or less well.
	Warning Severity = "warning"
	// Info: for the record; a failure here means "could not be checked".
	Info Severity = "info"
)

// Check is the outcome of one check.
type Check struct {
	Name     string   `json:"name"`
	OK       bool     `json:"ok"`
	Severity Severity `json:"severity"`
	Detail   string   `json:"detail"`
	Fix      string   `json:"fix,omitempty"` // what the administrator should do; empty when OK
}

// Default paths, as on a Debian or Qubes dom0.
const (
	DefaultLoopControl  = "/dev/loop-control"
	DefaultXenbus       = "/dev/xen/xenbus"
	DefaultSystemdDir   = "/run/systemd/system"
	DefaultUnit         = "xenblkd.service"
	defaultDialTimeout  = 2 * time.Second
	defaultXenstoreSock = "/run/xenstored/socket"
	legacyXenstoreSock  = "/var/run/xenstored/socket"
)

// Options are the paths and hooks the checks use. The zero value checks this
// host with the default paths; tests override fields.
type Options struct {
	Socket      string // daemon API socket; default $XENBLKD_SOCKET, else api.DefaultSocket
	LoopControl string // default DefaultLoopControl
	DevDir      string // where loopN nodes live; default /dev
	SysBlock    string // default /sys/block
	SysModule   string // default /sys/module
	SysBus      string // default /sys/bus
	SystemdDir  string // exists when systemd is PID 1; default DefaultSystemdDir
	Unit        string // default DefaultUnit
	TagPrefix   string // lo_file_name prefix of our devices; default api.DefaultTag
	TempDir     string // for the probe's backing file; default os.TempDir()
	// SysHypervisor is /sys/hypervisor/type; ScriptLink is what libxl execs
	// for script=xenblkd. Defaults DefaultSysHypervisor, api.DefaultEntry.
	SysHypervisor string
	ScriptLink    string
	// XenStorePaths are tried in order, as xenstore.Dial does; default
	// $XENSTORED_PATH (alone, if set), else the xenstored sockets, then DefaultXenbus.
	XenStorePaths []string
	// KernelRelease is uname -r; default from uname(2).
	KernelRelease string

	// Held returns the loop device numbers the daemon holds (from its status
	// API). Nil means unknown: tagged devices are then listed, not judged.
	Held func() (map[int]bool, error)
	// ProbeLoop binds and releases a probe loop device; default probeLoop.
	ProbeLoop func(o *Options) LoopProbe
	// LoopTag returns lo_file_name of a bound loop device; default LOOP_GET_STATUS64.
	LoopTag func(devPath string) (string, error)
	// Systemctl runs systemctl with args and returns its stdout; default exec.
	Systemctl func(ctx context.Context, args ...string) ([]byte, error)
	// Cluster returns the daemon's cluster mode configuration (nil: off);
	// default: from its status API at Socket.
	Cluster func(ctx context.Context) (*api.Cluster, error)
	// XenStoreRead reads a harmless node through the socket or device at path
	// (after the connect or open succeeded) to prove xenstored answers;
	// default: with internal/xenstore.
	XenStoreRead func(ctx context.Context, path string) error
}

// withDefaults returns a copy of o with every empty field set.
func (o Options) withDefaults() Options {
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	if o.Socket == "" {
		o.Socket = os.Getenv("XENBLKD_SOCKET")
	}
	def(&o.Socket, api.DefaultSocket)
	def(&o.LoopControl, DefaultLoopControl)
	def(&o.DevDir, "/dev")
	def(&o.SysBlock, "/sys/block")
	def(&o.SysModule, "/sys/module")
	def(&o.SysBus, "/sys/bus")
	def(&o.SystemdDir, DefaultSystemdDir)
	def(&o.Unit, DefaultUnit)
	def(&o.TagPrefix, api.DefaultTag)
	def(&o.TempDir, os.TempDir())
	def(&o.SysHypervisor, DefaultSysHypervisor)
	def(&o.ScriptLink, api.DefaultEntry)
	if o.XenStorePaths == nil {
		if p := os.Getenv("XENSTORED_PATH"); p != "" {
			o.XenStorePaths = []string{p}
		} else {
			o.XenStorePaths = []string{defaultXenstoreSock, legacyXenstoreSock, DefaultXenbus}
		}
	}
	if o.KernelRelease == "" {
		o.KernelRelease = kernelRelease()
	}
	if o.ProbeLoop == nil {
		o.ProbeLoop = probeLoop
	}
	if o.LoopTag == nil {
		o.LoopTag = loopTag
	}
	if o.Systemctl == nil {
		o.Systemctl = runSystemctl
	}
	if o.XenStoreRead == nil {
		o.XenStoreRead = readXenStore
	}
	if o.Cluster == nil {
		socket := o.Socket
		o.Cluster = func(ctx context.Context) (*api.Cluster, error) { return clusterOf(ctx, socket) }
	}
	return o
}

// Run runs every check, in an order where a failure explains the ones after it.
func Run(ctx context.Context, opts Options) []Check {
	o := opts.withDefaults()
	checks := []Check{checkHypervisor(&o), checkLoopControl(&o)}
	probe := o.ProbeLoop(&o)
	checks = append(checks,
		checkLoopConfigure(&o, probe),
		checkDiskSeq(&o, probe),
		checkXenStore(ctx, &o),
		checkBlkback(&o),
		checkSystemd(&o),
		checkFDStore(ctx, &o),
		checkUnitFlags(ctx, &o),
		checkDaemon(ctx, &o),
		checkScriptLink(&o),
		checkStaleLoops(&o),
		checkCluster(ctx, &o),
	)
	return checks
}

// ExitStatus is 0 when every required check passed, else 1.
func ExitStatus(checks []Check) int {
	for _, c := range checks {
		if !c.OK && c.Severity == Required {
			return 1
		}
	}
	return 0
}
