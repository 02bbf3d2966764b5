// Command xenblkd attaches Xen VM disks without the bash block script: a
// daemon that owns loop devices and writes XenStore, the hotplug entry point
// libxl execs as the disk's script, and operator commands.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/daemon"
	"xenblkd/internal/doctor"
	"xenblkd/internal/fdstore"
	"xenblkd/internal/hotplug"
	"xenblkd/internal/metrics"
	"xenblkd/internal/sanlock"
	"xenblkd/internal/server"
	"xenblkd/internal/unixsock"
	"xenblkd/internal/xenstore"
)

// version is set at build time with -ldflags '-X main.version=...'.
var version = "dev"

const usage = `NAME
    xenblkd - attach Xen VM disks (vbd backends) without the bash block script

SYNOPSIS
    xenblkd daemon [--socket PATH] [--tag PREFIX] [--metrics-listen ADDR]
                   [--presetup=false] [--scripts LIST] [--hotplug-entry PATH]
                   [--direct-io=auto|on|off]
                   [--cluster-lockspace NAME:PATH[:OFFSET] --cluster-host-id N
                    --cluster-shares DIR[=LABEL],... --cluster-devices GLOB,...
                    [--cluster-lease-dir DIR] [--cluster-handover DURATION]
                    [--cluster-host-name NAME] [--sanlock-dir DIR]]
    xenblkd add | remove          (the hotplug entry point, exec'd by libxl)
    xenblkd status [--json] [--socket PATH]
    xenblkd doctor [--json] [--socket PATH]
    xenblkd takeover [--undo | --status]
    xenblkd version
    xenblkd COMMAND --help

DESCRIPTION
    xenblkd replaces Xen's "block" hotplug script. The daemon owns every loop
    device it makes for a VM disk and writes the backend's physical-device in
    XenStore; the hotplug entry point, installed as the disk's script=, is a
    small static C program (xenblkd-hotplug) that forwards libxl's add/remove
    to the daemon and hands its error paths over to "xenblkd add|remove".

    Install the binary as /usr/sbin/xenblkd and xenblkd-hotplug as
    /etc/xen/scripts/xenblkd (make install), run "xenblkd daemon" (normally
    as a systemd service, with xenblkd.socket), and use script=xenblkd in a
    disk specification, or run "xenblkd takeover" to serve every disk that
    names no script. See docs/usage.md.

COMMANDS
    daemon    run the daemon (foreground; logs to stderr)
    add       attach the disk of the backend named by $XENBUS_PATH
    remove    release the disk of the backend named by $XENBUS_PATH
    status    list attachments and the loop devices held
    doctor    check what this host offers xenblkd and say what to fix
    takeover  serve as /etc/xen/scripts/block (dpkg-divert); --undo gives it back
    version   print the version

ENVIRONMENT
    XENBLKD_SOCKET    the daemon's API socket (default /run/xenblkd/api.sock)
    XENSTORED_PATH    xenstored's socket (default /run/xenstored/socket,
                      /var/run/xenstored/socket, then /dev/xen/xenbus)
    XENBLKD_LOG_LEVEL the daemon's log level: debug, info (default), warn, error

    All flags and variables: docs/configuration.md; man 8 xenblkd.
`

const daemonUsage = `NAME
    xenblkd daemon - run the xenblkd daemon

SYNOPSIS
    xenblkd daemon [--socket PATH] [--tag PREFIX] [--metrics-listen ADDR]
                   [--presetup=false] [--scripts LIST] [--hotplug-entry PATH]
                   [--direct-io=auto|on|off]
                   [--cluster-lockspace NAME:PATH[:OFFSET] --cluster-host-id N
                    --cluster-shares DIR[=LABEL],... --cluster-devices GLOB,...
                    [--cluster-lease-dir DIR] [--cluster-handover DURATION]
                    [--cluster-host-name NAME] [--sanlock-dir DIR]]

DESCRIPTION
    Serves the API on a unix socket (directory 0700, socket 0600, root only),
    attaches and releases disks for the hotplug entry point, and holds the fd
    of every loop device it made for as long as a VM uses it (the devices are
    AUTOCLEAR: the kernel frees each once the last user lets go).

    Under systemd, the fd of every loop device is also pushed into the
    unit's fd store before the backend's physical-device is written. On
    start the daemon recovers before it serves: it adopts the fds systemd
    hands back (each verified: device number, diskseq, tag), rebuilds every
    attachment from XenStore (backends whose script is ours and whose
    physical-device is set; a loop device not in the store is re-opened by
    number if its diskseq is unchanged), adopts the loop devices the stock
    block script made for backends that are ours since "xenblkd takeover"
    (verified, made AUTOCLEAR, held; one that does not check out is left
    alone), and releases devices no backend uses. Then it tells systemd READY=1 (when $NOTIFY_SOCKET is set) and
    logs one "recovery done" line with the counts.

    SIGTERM or SIGINT stops it after the requests in flight. Devices
    xen-blkback has opened stay with the running VMs. Without systemd, or
    after "systemctl stop" on systemd < 254 (which drops the fd store), a
    device no backend had opened yet is freed; recovery reports such a
    backend as mismatched, removes its physical-device and writes
    hotplug-error: re-attach that disk. See docs/fdstore.md.

OPTIONS
    --socket PATH   API socket (default $XENBLKD_SOCKET, else /run/xenblkd/api.sock);
                    its directory must not be writable by non-root users
    --tag PREFIX    prefix of lo_file_name of the loop devices it makes
                    (default "xenblkd:")
    --metrics-listen ADDR
                    serve Prometheus metrics (GET /metrics) on ADDR:
                    127.0.0.1:PORT, [::1]:PORT or unix:/PATH (default: off;
                    xenblkd.service: unix:/run/xenblkd/metrics.sock)
    --presetup=BOOL pre-setup (default true): watch backend/vbd and attach a
                    new disk whose script is ours as soon as libxl's
                    transaction writes its backend, before libxl execs the
                    script; the exec'd add then only confirms (a disk pre-setup
                    refused it decides again). A backend removed before its
                    script ran is released. --presetup=false: every add is done by
                    the exec'd entry point.
    --scripts LIST  comma-separated scripts that name xenblkd besides any
                    path whose base name is xenblkd: an entry with a "/" is
                    compared with the backend's script node (the path libxl
                    writes), one without with its base name. Pre-setup,
                    recovery and adoption touch only backends whose script
                    is ours.
    --hotplug-entry PATH
                    the hotplug entry (default /etc/xen/scripts/xenblkd): a
                    script that is the same file (device and inode) is ours,
                    so /etc/xen/scripts/block is once "xenblkd takeover"
                    made it a link to the entry, and is not after --undo.
    --direct-io=auto|on|off
                    how new loop devices read and write image files (default
                    auto): auto uses direct I/O (no copy of the image in
                    dom0's page cache) on ext4 and XFS, and on Btrfs only for
                    NOCOW files (chattr +C: no data checksums); buffered on
                    tmpfs and other file systems. on: direct I/O wherever the
                    kernel allows it; off: always buffered. The kernel's
                    answer is verified; where it refuses, the device is
                    buffered and the log says so. Guests keep 512-byte
                    sectors: where direct I/O would need bigger ones (a 4Kn
                    disk or dm-crypt with 4096-byte sectors) the device is
                    buffered. Per disk, extended attributes of the image win:
                    user.xenblkd.direct-io (auto, on, off) and
                    user.xenblkd.block-size (512, 4096), e.g.
                    setfattr -n user.xenblkd.direct-io -v off IMAGE.
                    See docs/configuration.md.
    --cluster-lockspace NAME:PATH[:OFFSET]
                    cluster mode (default off): no disk on shared storage is
                    used read-write on two hosts at once. The sanlock
                    lockspace NAME lives in PATH (a file on shared storage or
                    a small shared LUN, initialised with "sanlock client
                    init -s"); the daemon joins it as --cluster-host-id
                    (1-2000, unique in the pool). An attachment of a shared
                    target holds a sanlock lease: exclusive when read-write,
                    shared when read-only; another host's use is refused,
                    naming that host and VM. See docs/cluster.md.
    --cluster-host-id N
                    this host's id in the lockspace
    --cluster-shares DIR[=LABEL],...
                    files under each DIR are shared targets, named
                    LABEL/PATH-UNDER-DIR on every host (LABEL defaults to DIR:
                    give one where hosts mount the share at different places)
    --cluster-devices GLOB,...
                    block devices whose path matches a pattern are shared
                    targets, named by their WWN, dm UUID or serial
    --cluster-lease-dir DIR
                    where the lease files live, on shared storage (default:
                    the lockspace file's directory)
    --cluster-handover DURATION
                    a VM migrating here may attach while the source host
                    still holds the lease; past DURATION (default 30s) a
                    hand-over still waiting is logged and counted
    --cluster-host-name NAME
                    this host's name in lease notes and refusals (default:
                    the host name)
    --sanlock-dir DIR
                    the sanlock daemon's run directory (default
                    $SANLOCK_RUN_DIR, else /run/sanlock)

ENVIRONMENT
    XENBLKD_SOCKET  the API socket when --socket is not given
    XENSTORED_PATH  xenstored's socket or xenbus device; when set, nothing
                    else is tried (default /run/xenstored/socket,
                    /var/run/xenstored/socket, then /dev/xen/xenbus)
    XENBLKD_LOG_LEVEL
                    debug, info (default), warn or error
    NOTIFY_SOCKET   set by systemd: READY=1, STATUS= and the fd store
    LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES
                    set by systemd: the API socket of xenblkd.socket (fd
                    name "api"; then --socket is not created) and the loop
                    device fds handed back from the fd store after a restart
    JOURNAL_STREAM  set by systemd: log lines then leave out the timestamp
                    and carry their priority for journald
    WATCHDOG_USEC, WATCHDOG_PID
                    set by systemd (WatchdogSec=): WATCHDOG=1 is sent every
                    half of it while the API answers and XenStore is connected

EXIT STATUS
    0 stopped by SIGTERM/SIGINT; 1 could not start or serve (e.g. xenstored
    not running: systemd restarts it); 78 a configuration error (bad flag or
    value, a malformed or non-loopback --metrics-listen, a socket directory
    non-root users can write), which xenblkd.service does not restart.
`

const hotplugUsage = `NAME
    xenblkd add, xenblkd remove - the vbd hotplug entry point

SYNOPSIS
    XENBUS_PATH=backend/vbd/<domid>/<devid> xenblkd add|remove
    /etc/xen/scripts/xenblkd add|remove      (as libxl execs it)
    /etc/xen/scripts/block add|remove        (the same, after xenblkd takeover)

DESCRIPTION
    libxl execs the disk's script with argv [script, add|remove] and the
    environment XENBUS_PATH (relative to the backend domain), XENBUS_TYPE=vbd,
    XENBUS_BASE_PATH=backend and script. This forwards the request to the
    daemon and exits 0 on success.

    The script libxl execs is the C entry (xenblkd-hotplug, installed as
    /etc/xen/scripts/xenblkd): it does the success path itself and execs
    "xenblkd add|remove" with the same argv and environment for everything
    else. Without a daemon listening, the socket is retried for up to 10 s
    (under systemd, xenblkd.socket holds it across restarts, so a request
    waits there instead). A daemon that does not run as root is refused.

    add reads params and mode from the backend, opens the target (a block
    device is used as is, a regular file gets a loop device; a relative params
    names a node under /dev, without ".."; an unbound loop device or a deleted
    file is refused), applies the sharing rules (docs/sharing.md; mode w!
    skips them)
    and writes physical-device, physical-device-path, diskseq and
    hotplug-status=connected in one transaction.

    remove releases the backend's device (from the daemon's own record, so it
    works when the backend nodes are gone) and removes physical-device and
    diskseq. Removing twice is fine.

    On failure the message is written to the backend's hotplug-error (libxl
    logs it) and to stderr, and the exit status is non-zero: 1 for a refused
    or failed request, 2 for a malformed invocation.

ENVIRONMENT
    XENBUS_PATH       backend/vbd/<domid>/<devid> (required)
    XENBUS_TYPE       must be vbd if set
    XENBLKD_SOCKET    the daemon's API socket (default /run/xenblkd/api.sock)
    XENSTORED_PATH    used only to record an error when the daemon is down
    XENBLKD_CONNECT_TIMEOUT
                      how long a missing or refused socket is retried before
                      the add fails (default and maximum 10s; e.g. 2s)
    XENBLKD_BIN       read by the C entry: the binary it hands error paths
                      over to (default /usr/sbin/xenblkd)
    XENBLKD_ENTRY_REPLY, XENBLKD_ENTRY_ERROR
                      set by the C entry when it hands over after sending the
                      request: the daemon's reply, or why none came; reported
                      without asking the daemon again
`

func main() {
	os.Exit(run(os.Args, os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := ""
	if len(args) > 1 {
		cmd = args[1]
	}
	rest := args[min(2, len(args)):]
	switch cmd {
	case "add", "remove":
		if len(rest) > 0 && isHelp(rest[0]) {
			fmt.Fprint(stdout, hotplugUsage)
			return 0
		}
		return hotplugEntry(cmd, stderr)
	case "daemon":
		return runDaemon(rest, stdout, stderr)
	case "status":
		return runStatus(rest, stdout, stderr) // status.go
	case "doctor":
		return doctor.Main(context.Background(), stdout, stderr, rest)
	case "takeover":
		return runTakeover(rest, stdout, stderr) // takeover.go
	case "version", "--version":
		fmt.Fprintln(stdout, "xenblkd", version)
		return 0
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	// libxl passes only add or remove; anything else from a hotplug caller
	// still gets its message into hotplug-error.
	msg := fmt.Sprintf("unknown action %q: libxl runs the script with add or remove", cmd)
	if cmd == "" {
		msg = "no action given: libxl runs the script with add or remove"
	}
	if b, err := hotplug.ParseBackendPath(os.Getenv("XENBUS_PATH")); err == nil {
		msg = recordError(b, msg)
	} else {
		msg += " (run xenblkd --help)"
	}
	fmt.Fprintln(stderr, "xenblkd:", msg)
	return 2
}

func isHelp(s string) bool { return s == "-h" || s == "-help" || s == "--help" || s == "help" }

// envOr is $name, or def when it is unset or empty.
func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func socketPath() string { return envOr("XENBLKD_SOCKET", api.DefaultSocket) }

// hotplugEntry is the Go half of the entry libxl execs: the C entry
// (cmd/xenblkd-hotplug) does the success path and hands its error and slow
// paths over to this, with the same argv and environment. It reports the
// daemon's answer the C entry passed on (XENBLKD_ENTRY_REPLY or
// XENBLKD_ENTRY_ERROR), or else asks the daemon itself, waiting for one to
// start. XenStore is dialled only to record an error the daemon could not.
func hotplugEntry(action string, stderr io.Writer) int {
	b, err := hotplug.ParseBackendPath(os.Getenv("XENBUS_PATH"))
	if err != nil {
		fmt.Fprintf(stderr, "xenblkd %s: %v\n", action, err)
		return 2
	}
	if t := os.Getenv("XENBUS_TYPE"); t != "" && t != "vbd" {
		msg := recordError(b, fmt.Sprintf("XENBUS_TYPE=%q: xenblkd handles vbd (disk) backends only", t))
		fmt.Fprintf(stderr, "xenblkd %s: %s\n", action, msg)
		return 2
	}
	resp, err := daemonAnswer(action, b)
	if err == nil && resp.OK {
		return 0
	}
	msg := resp.Error
	if err != nil {
		msg = err.Error()
	}
	if action == api.OpAdd && !resp.ErrorRecorded {
		msg = recordError(b, msg)
	}
	fmt.Fprintf(stderr, "xenblkd %s %s: %s\n", action, b, msg)
	return 1
}

// DefaultConnectWait is how long the entry waits for a daemon to listen
// (without systemd's socket, a daemon restarting is briefly not there).
const DefaultConnectWait = 10 * time.Second

// daemonAnswer is the daemon's answer to action on b: the one the C entry
// got (the request is never sent twice), or a new request's.
func daemonAnswer(action string, b hotplug.Backend) (api.Response, error) {
	if msg, ok := os.LookupEnv("XENBLKD_ENTRY_ERROR"); ok {
		return api.Response{}, errors.New(msg)
	}
	if reply, ok := os.LookupEnv("XENBLKD_ENTRY_REPLY"); ok {
		return api.DecodeReply(socketPath(), []byte(reply))
	}
	wait := DefaultConnectWait
	if v := os.Getenv("XENBLKD_CONNECT_TIMEOUT"); v != "" {
		if d, err := time.ParseDuration(v); err == nil && d >= 0 && d < wait {
			wait = d
		}
	}
	return api.CallHotplug(context.Background(), socketPath(), api.Request{Op: action, Path: b.Path()}, api.HotplugOptions{ConnectWait: wait})
}

// recordError writes msg to the backend's hotplug-error and returns msg,
// extended with why if that failed too.
func recordError(b hotplug.Backend, msg string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := xenstore.Dial(ctx)
	if err == nil {
		defer c.Close()
		err = hotplug.Fail(ctx, hotplug.ClientStore{Client: c}, b, msg)
	}
	if err != nil {
		return fmt.Sprintf("%s (and could not record it in hotplug-error: %v)", msg, err)
	}
	return msg
}

// xenstoreStartWait bounds how long a starting daemon waits for xenstored
// (booting, or restarting). Shorter than the unit's WatchdogSec= (30 s), and
// long enough that a restart loop while xenstored is down stays far below
// the unit's start limit (50 in 60 s), which would fail the unit and drop
// its fd store.
const xenstoreStartWait = 20 * time.Second

// dialXenStore connects to XenStore, retrying with backoff (100 ms to 1 s)
// for up to xenstoreStartWait while nothing answers yet.
func dialXenStore(ctx context.Context, log *slog.Logger) (*xenstore.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, xenstoreStartWait)
	defer cancel()
	for delay, logged := 100*time.Millisecond, false; ; delay = min(2*delay, time.Second) {
		xs, err := xenstore.Dial(ctx)
		if err == nil {
			return xs, nil
		}
		if !logged {
			log.Warn("waiting for XenStore", "err", err, "for", xenstoreStartWait)
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(delay):
		}
	}
}

// exitConfig is the daemon's exit status for a configuration error (a bad
// flag or address, an unsafe socket directory): a restart cannot fix it, so
// dist/xenblkd.service lists it in RestartPreventExitStatus=. 78 is
// EX_CONFIG of sysexits.h.
const exitConfig = 78

// parseFlags parses a command's flags: --help prints usage on stdout (exit
// 0); a bad flag prints one line and a hint on stderr. ok is false when the
// command should exit with code.
func parseFlags(fs *flag.FlagSet, args []string, usage string, stdout, stderr io.Writer, bad int) (code int, ok bool) {
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stdout, usage)
		return 0, false
	}
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err != nil {
		fmt.Fprintf(stderr, "xenblkd %s: %v (see xenblkd %s --help)\n", fs.Name(), err, fs.Name())
		return bad, false
	}
	return 0, true
}

func runDaemon(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("daemon", flag.ContinueOnError)
	socket := fs.String("socket", socketPath(), "API socket")
	tag := fs.String("tag", api.DefaultTag, "lo_file_name prefix of loop devices")
	metricsListen := fs.String("metrics-listen", "", "serve Prometheus metrics on this address (off if empty)")
	presetup := fs.Bool("presetup", true, "set disks up as soon as libxl writes their backend (presetup.go)")
	scripts := fs.String("scripts", "", "comma-separated extra script paths that name xenblkd")
	directIO := fs.String("direct-io", string(daemon.DirectIOAuto), "direct I/O on loop devices: auto, on or off")
	entry := fs.String("hotplug-entry", api.DefaultEntry, "the hotplug entry; a script that is the same file is ours")
	cluster := clusterFlags{ // cluster.go
		lockspace:  fs.String("cluster-lockspace", "", "sanlock lockspace NAME:PATH[:OFFSET] on shared storage (cluster mode; off if empty)"),
		hostID:     fs.Uint64("cluster-host-id", 0, "this host's id in the lockspace, 1-2000, unique in the pool"),
		leaseDir:   fs.String("cluster-lease-dir", "", "directory on shared storage for the lease files (default: the lockspace file's)"),
		shares:     fs.String("cluster-shares", "", "comma-separated DIR[=LABEL]: files under DIR are shared targets"),
		devices:    fs.String("cluster-devices", "", "comma-separated glob patterns of shared block devices"),
		handover:   fs.Duration("cluster-handover", 30*time.Second, "how long a migration's lease hand-over may take before it is reported"),
		hostName:   fs.String("cluster-host-name", "", "this host's name in lease notes and refusals (default: the host name)"),
		sanlockDir: fs.String("sanlock-dir", envOr("SANLOCK_RUN_DIR", sanlock.DefaultDir), "the sanlock daemon's run directory (its socket)"),
	}
	if code, ok := parseFlags(fs, args, daemonUsage, stdout, stderr, exitConfig); !ok {
		return code
	}
	clusterCfg, clustered, err := cluster.config()
	if err != nil {
		fmt.Fprintf(stderr, "xenblkd daemon: %v (see xenblkd daemon --help)\n", err)
		return exitConfig
	}
	dio, err := daemon.ParseDirectIO(*directIO)
	if err != nil {
		fmt.Fprintf(stderr, "xenblkd daemon: --direct-io: %v (see xenblkd daemon --help)\n", err)
		return exitConfig
	}
	log := newLogger(stderr) // log.go
	slog.SetDefault(log)     // one logger, also for the packages that log through slog's default
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// What systemd passed: the API socket (xenblkd.socket, by name) and the
	// fd store's loop devices, which recovery verifies and adopts.
	passed, err := fdstore.Listen()
	if err != nil {
		log.Error("cannot read the fds systemd passed; none are used", "err", err)
	}
	sockets, stored := fdstore.Take(passed, api.SocketFDName)

	xs, err := dialXenStore(ctx, log)
	if err != nil {
		log.Error("cannot reach XenStore: is xenstored running? (XENSTORED_PATH overrides the socket)", "err", err)
		return 1
	}
	defer xs.Close()
	xs.OnConnection(func(up bool, err error) {
		if up {
			log.Info("XenStore connection restored: watches re-registered, pre-setup rescans")
		} else {
			log.Warn("XenStore connection lost: redialling", "err", err)
		}
	})
	l, activated, err := listenAPI(*socket, sockets)
	if err != nil {
		log.Error("cannot serve the API", "err", err)
		if errors.Is(err, unixsock.ErrUnsafeDir) {
			return exitConfig
		}
		return 1
	}
	d := daemon.New(log, hotplug.ClientStore{Client: xs}, daemon.NewHost(*tag, daemon.IOPolicy{DirectIO: dio}, log))
	d.RegisterBuildInfo(version)
	if clustered {
		leases, err := startCluster(ctx, clusterCfg, *cluster.sanlockDir, log)
		if err != nil {
			log.Error("cluster mode: cannot hold leases; exiting", "err", err)
			return 1
		}
		defer leases.Close() // the leases stay with sanlock, as orphans for the next daemon
		d.SetLeases(leases)
	}
	if *metricsListen != "" {
		ml, err := metrics.Listen(*metricsListen)
		if err != nil {
			log.Error("cannot serve metrics", "err", err)
			// A malformed or non-loopback address is a configuration
			// error; a failed bind or socket(2) is not.
			var opErr *net.OpError
			if !errors.As(err, &opErr) {
				return exitConfig
			}
			return 1
		}
		log.Info("serving metrics", "addr", ml.Addr().String(), "path", metrics.Path)
		mctx, stopMetrics := context.WithCancel(ctx)
		metricsDone := make(chan struct{})
		go func() { metrics.Serve(mctx, ml, d.MetricsHandler(), log); close(metricsDone) }()
		defer func() { stopMetrics(); <-metricsDone }()
	}
	// Recovery before READY=1 and before serving: adopt the fd store's devices,
	// rebuild attachments from XenStore, release what no backend uses.
	d.Scripts = daemon.Scripts{Extra: splitList(*scripts), Entry: *entry}
	sum, err := d.Recover(ctx, daemon.RecoverOptions{Tag: *tag, Stored: stored})
	if err != nil {
		log.Error("recovery failed; exiting (the fd store, if any, keeps the devices)", "err", err)
		return 1
	}
	if *presetup {
		stopPresetup, err := d.StartPresetup(ctx, xs, daemon.PresetupOptions{})
		if err != nil {
			log.Error("pre-setup is off: the hotplug entry does every add itself", "err", err)
		} else {
			defer stopPresetup()
		}
	}
	if err := fdstore.Notify("READY=1\nSTATUS=recovered: " + sum.String()); err != nil {
		log.Warn("could not notify systemd", "err", err)
	}
	log.Info("serving", "socket", l.Addr().String(), "socket_activated", activated, "xenstore", xs.Target(), "version", version, "pid", os.Getpid())
	if interval := watchdogInterval(os.Getenv, os.Getpid()); interval > 0 {
		wctx, stopWatchdog := context.WithCancel(ctx)
		watchdogDone := make(chan struct{})
		go func() {
			runWatchdog(wctx, log, interval, daemonHealth(l.Addr().String(), xs.Connected))
			close(watchdogDone)
		}()
		defer func() { stopWatchdog(); <-watchdogDone }()
	}
	if err := server.Serve(ctx, l, d, log); err != nil {
		log.Error("serve", "err", err)
		return 1
	}
	if !activated {
		os.Remove(*socket) // systemd's socket stays: the next daemon's callers queue on it
	}
	log.Info("stopped; held loop devices are released as the process exits (devices opened by xen-blkback stay bound)")
	return 0
}

// listenAPI is the API listener: the socket systemd passed (socket
// activation, xenblkd.socket), else a new one at path.
func listenAPI(path string, passed []fdstore.File) (l *net.UnixListener, activated bool, err error) {
	if len(passed) == 0 {
		l, err = server.Listen(path)
		return l, false, err
	}
	for _, extra := range passed[1:] {
		unix.Close(extra.Fd) // xenblkd.socket has one ListenStream=
	}
	l, err = server.ListenFD(passed[0].Fd)
	return l, true, err
}
