package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"xenblkd/test/libxl"
)

// peer is one implementation of the vbd hotplug script, exec'd as libxl (4.17
// to 4.20) execs a disk's script (libxl_device.c device_hotplug): argv [script, op],
// env script/XENBUS_TYPE/XENBUS_PATH/XENBUS_BASE_PATH, stdin /dev/null,
// stdout to libxl's stderr (here: a log file, so no pipe-copy goroutines).
type peer struct {
	name     string
	slot     int      // column of the table: slotStock, slotXen, slotPre
	script   string   // the path in the backend's `script` node and argv[0]
	extraEnv []string // XENSTORED_PATH, XENBLKD_SOCKET
	log      *os.File
	daemon   *exec.Cmd // xenblkd only, while running
	// xenblkd only: how to start its daemon. Only one daemon runs at a time
	// (bench.use), so a pre-setup daemon never reacts to another peer's disks.
	bin, daemonArgs, dir, xsSocket string
	lastCPU                        time.Duration // user+sys CPU of the last exec'd script
}

// Table columns.
const (
	slotStock = iota
	slotXen   // xenblkd, daemon --presetup=false: the exec'd add does the work
	slotPre   // xenblkd, daemon --presetup=true (the default)
	nSlots
)

var slotNames = [nSlots]string{"stock", "xenblkd", "xenblkd pre-setup"}

var basePath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func (p *peer) env(xbPath string) []string {
	return append(append(libxl.ScriptEnv(p.script, xbPath), basePath), p.extraEnv...)
}

// run execs the script and returns exec-to-exit wall time.
func (p *peer) run(op, xbPath string) (time.Duration, error) {
	cmd := &exec.Cmd{Path: p.script, Args: []string{p.script, op}, Env: p.env(xbPath), Stdout: p.log, Stderr: p.log}
	off, _ := p.log.Seek(0, 1)
	t0 := time.Now()
	err := cmd.Run()
	d := time.Since(t0)
	if cmd.ProcessState != nil {
		p.lastCPU = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	}
	if err != nil {
		return d, fmt.Errorf("%s %s %s: %w%s", p.name, op, xbPath, err, p.logTail(off))
	}
	return d, nil
}

func (p *peer) logTail(off int64) string {
	b, err := os.ReadFile(p.log.Name())
	if err != nil || int64(len(b)) < off {
		return ""
	}
	b = b[off:]
	if p.name == "stock" { // the script sends its stderr to this log itself
		if h, err := os.ReadFile("/var/log/xen/xen-hotplug.log"); err == nil {
			b = append(b, h[max(0, len(h)-400):]...)
		}
	}
	if len(b) > 800 {
		b = b[len(b)-800:]
	}
	return "\n  output: " + strings.TrimSpace(string(b))
}

// xenblkdAvailable reports whether bin/xenblkd is past the skeleton.
func xenblkdAvailable(bin string) (bool, string) {
	if _, err := os.Stat(bin); err != nil {
		return false, err.Error()
	}
	out, err := exec.Command(bin, "daemon", "--help").CombinedOutput()
	if bytes.Contains(out, []byte("not yet implemented")) {
		return false, bin + " says: " + strings.TrimSpace(string(out))
	}
	if err != nil && len(out) == 0 {
		return false, fmt.Sprintf("%s daemon --help: %v", bin, err)
	}
	return true, ""
}

// newXenblkd describes a xenblkd peer: script is the C entry (installed as
// <dir>/scripts/xenblkd, a name pre-setup recognises), handing over to bin;
// its daemon is started by start. The command line is an adapter:
// -daemon-args, "{socket}" is replaced; extra (e.g. --presetup=false) is
// appended.
func newXenblkd(name string, slot int, bin, script, daemonArgs, extra, dir, xsSocket string, log *os.File) *peer {
	sock := filepath.Join(dir, name, "api.sock")
	abs, _ := filepath.Abs(bin)
	return &peer{name: name, slot: slot, script: script, log: log, bin: bin, daemonArgs: daemonArgs + " " + extra, dir: dir, xsSocket: xsSocket,
		extraEnv: []string{"XENSTORED_PATH=" + xsSocket, "XENBLKD_SOCKET=" + sock, "XENBLKD_BIN=" + abs}}
}

// installEntry copies the C entry to <dir>/scripts/xenblkd, as make install
// puts it in /etc/xen/scripts, and returns that path.
func installEntry(entry, dir string) (string, error) {
	b, err := os.ReadFile(entry)
	if err != nil {
		return "", fmt.Errorf("the C hotplug entry: %w (make build)", err)
	}
	script := filepath.Join(dir, "scripts", "xenblkd")
	os.MkdirAll(filepath.Dir(script), 0o755)
	return script, os.WriteFile(script, b, 0o755)
}

func (p *peer) socket() string { return strings.TrimPrefix(p.extraEnv[1], "XENBLKD_SOCKET=") }

// start starts the daemon against xsSocket (the private xenstored, or the
// bench's counting proxy in front of it) and waits for its API socket.
func (p *peer) start(xsSocket string) error {
	if p.daemon != nil {
		return nil
	}
	sock := p.socket()
	os.MkdirAll(filepath.Dir(sock), 0o700)
	args := strings.Fields(strings.ReplaceAll(p.daemonArgs, "{socket}", sock))
	env := []string{basePath, "XENSTORED_PATH=" + xsSocket, "XENBLKD_SOCKET=" + sock}
	off, _ := p.log.Seek(0, 1)
	cmd := &exec.Cmd{Path: p.bin, Args: append([]string{p.bin}, args...), Env: env, Stdout: p.log, Stderr: p.log,
		SysProcAttr: &syscall.SysProcAttr{Setpgid: true}}
	if err := cmd.Start(); err != nil {
		return err
	}
	p.daemon = cmd
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.After(15 * time.Second)
	for {
		// "serving" is logged after recovery and pre-setup's watch are set up.
		if b, err := os.ReadFile(p.log.Name()); err == nil && int64(len(b)) > off && bytes.Contains(b[off:], []byte("msg=serving")) {
			return nil
		}
		select {
		case err := <-exited:
			p.daemon = nil
			return fmt.Errorf("xenblkd daemon exited before serving on %s: %v%s", sock, err, p.logTail(off))
		case <-deadline:
			p.stop()
			return fmt.Errorf("xenblkd daemon did not serve on %s in 15s%s", sock, p.logTail(off))
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// stop terminates the daemon we started, by pid.
func (p *peer) stop() {
	if p == nil || p.daemon == nil || p.daemon.Process == nil {
		return
	}
	p.daemon.Process.Signal(syscall.SIGTERM)
	for range 300 {
		if err := p.daemon.Process.Signal(syscall.Signal(0)); errors.Is(err, os.ErrProcessDone) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	p.daemon.Process.Kill()
	p.daemon = nil
}

// rssKiB reads VmRSS of the daemon from /proc/<pid>/status.
func (p *peer) rssKiB() int {
	if p.daemon == nil {
		return -1
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.daemon.Process.Pid))
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			var n int
			fmt.Sscan(f[1], &n)
			return n
		}
	}
	return -1
}

var _ = context.Background

// peerInSlot returns the peer in slot, or nil if that peer does not run.
func peerInSlot(peers []*peer, slot int) *peer {
	for _, p := range peers {
		if p.slot == slot {
			return p
		}
	}
	return nil
}
