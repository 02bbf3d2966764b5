package doctor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/xenstore/xenstoretest"
)

// fakeOptions points every path at an empty temp dir and every hook at a fake.
func fakeOptions(t *testing.T) *Options {
	t.Helper()
	dir := t.TempDir()
	o := Options{
		Socket:        filepath.Join(dir, "api.sock"),
		LoopControl:   filepath.Join(dir, "loop-control"),
		DevDir:        filepath.Join(dir, "dev"),
		SysBlock:      filepath.Join(dir, "sys/block"),
		SysModule:     filepath.Join(dir, "sys/module"),
		SysBus:        filepath.Join(dir, "sys/bus"),
		SystemdDir:    filepath.Join(dir, "run/systemd/system"),
		TempDir:       dir,
		XenStorePaths: []string{filepath.Join(dir, "xenstored.sock"), filepath.Join(dir, "xenbus")},
		KernelRelease: "6.1.0-28-amd64",
		ProbeLoop:     func(*Options) LoopProbe { return LoopProbe{Device: "/dev/loop7", DiskSeq: 9} },
		LoopTag:       func(string) (string, error) { return "", unix.ENXIO },
		Systemctl: func(context.Context, ...string) ([]byte, error) {
			return nil, errors.New("systemctl must not run in this test")
		},
		XenStoreRead: func(context.Context, string) error { return nil },
		Held:         func() (map[int]bool, error) { return map[int]bool{}, nil },
		Cluster:      func(context.Context) (*api.Cluster, error) { return nil, nil },
	}
	o.SysHypervisor = filepath.Join(dir, "sys/hypervisor/type")
	o.ScriptLink = filepath.Join(dir, "etc/xen/scripts/xenblkd")
	for path, content := range map[string]string{o.SysHypervisor: "xen\n", filepath.Join(dir, "usr/sbin/xenblkd"): "#!/bin/sh\n"} {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(o.ScriptLink), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(dir, "usr/sbin/xenblkd"), o.ScriptLink); err != nil {
		t.Fatal(err)
	}
	o = o.withDefaults()
	return &o
}

// listen serves a unix socket at path until the test ends.
func listen(t *testing.T, path string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
}

// staleSocket leaves a socket file nobody listens on (connect: ECONNREFUSED).
func staleSocket(t *testing.T, path string) {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
}

func mkdir(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(path, 0o755); err != nil {
		t.Fatal(err)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	mkdir(t, filepath.Dir(path))
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func want(t *testing.T, c Check, ok bool, sev Severity, detail string) {
	t.Helper()
	if c.OK != ok || c.Severity != sev || !strings.Contains(c.Detail, detail) {
		t.Errorf("%s: got OK=%v severity=%s detail=%q; want OK=%v severity=%s detail containing %q",
			c.Name, c.OK, c.Severity, c.Detail, ok, sev, detail)
	}
	if !c.OK && c.Severity != Info && c.Fix == "" {
		t.Errorf("%s: failed without a fix", c.Name)
	}
}

func TestLoopControl(t *testing.T) {
	o := fakeOptions(t)
	want(t, checkLoopControl(o), false, Required, "no such file")

	writeFile(t, o.LoopControl, "")
	want(t, checkLoopControl(o), false, Required, "not a character device")

	o.LoopControl = "/dev/null" // a character device anyone may open
	want(t, checkLoopControl(o), true, Required, "opened read-write")
}

func TestLoopConfigure(t *testing.T) {
	tests := []struct {
		name   string
		kernel string
		probe  LoopProbe
		ok     bool
		detail string
		fix    string
	}{
		{"works", "6.1.0", LoopProbe{Device: "/dev/loop3"}, true, "bound /dev/loop3", ""},
		{"rejected", "5.4.0", LoopProbe{Err: fmt.Errorf("LOOP_CONFIGURE: %w", unix.EINVAL)}, false, "rejects LOOP_CONFIGURE", "5.8"},
		{"old kernel", "5.4.0", LoopProbe{Err: unix.ENOENT}, false, "older than 5.8", "5.8"},
		{"no loop-control", "6.1.0", LoopProbe{Err: unix.ENOENT}, false, "probe failed", NameLoopControl},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := fakeOptions(t)
			o.KernelRelease = tt.kernel
			c := checkLoopConfigure(o, tt.probe)
			want(t, c, tt.ok, Required, tt.detail)
			if !strings.Contains(c.Fix, tt.fix) {
				t.Errorf("fix = %q, want it to mention %q", c.Fix, tt.fix)
			}
		})
	}
}

func TestDiskSeq(t *testing.T) {
	tests := []struct {
		name   string
		kernel string
		probe  LoopProbe
		ok     bool
		detail string
	}{
		{"works", "6.1.0", LoopProbe{Device: "/dev/loop3", DiskSeq: 42}, true, "= 42"},
		{"ioctl fails", "5.10.0", LoopProbe{Device: "/dev/loop3", DiskSeqErr: unix.ENOTTY}, false, "BLKGETDISKSEQ failed"},
		{"no probe, new kernel", "6.1.0", LoopProbe{Err: unix.EIO}, false, "not probed"},
		{"no probe, old kernel", "5.10.0", LoopProbe{Err: unix.EIO}, false, "older than 5.15"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := fakeOptions(t)
			o.KernelRelease = tt.kernel
			want(t, checkDiskSeq(o, tt.probe), tt.ok, Required, tt.detail)
		})
	}
}

func TestXenStore(t *testing.T) {
	ctx := context.Background()
	t.Run("nothing", func(t *testing.T) {
		o := fakeOptions(t)
		want(t, checkXenStore(ctx, o), false, Required, "no XenStore")
	})
	t.Run("socket", func(t *testing.T) {
		o := fakeOptions(t)
		listen(t, o.XenStorePaths[0])
		want(t, checkXenStore(ctx, o), true, Required, "answers on "+o.XenStorePaths[0])
	})
	t.Run("stale socket", func(t *testing.T) {
		o := fakeOptions(t)
		staleSocket(t, o.XenStorePaths[0])
		want(t, checkXenStore(ctx, o), false, Required, "connection refused")
	})
	t.Run("xenbus", func(t *testing.T) {
		o := fakeOptions(t)
		o.XenStorePaths = []string{o.XenStorePaths[0], "/dev/null"}
		want(t, checkXenStore(ctx, o), true, Required, "answers on /dev/null")
	})
	t.Run("not a socket", func(t *testing.T) {
		o := fakeOptions(t)
		writeFile(t, o.XenStorePaths[0], "")
		want(t, checkXenStore(ctx, o), false, Required, "neither a socket")
	})
	t.Run("read fails", func(t *testing.T) {
		o := fakeOptions(t)
		listen(t, o.XenStorePaths[0])
		o.XenStoreRead = func(context.Context, string) error { return unix.EIO }
		want(t, checkXenStore(ctx, o), false, Required, "input/output error")
	})
	t.Run("read works", func(t *testing.T) {
		o := fakeOptions(t)
		listen(t, o.XenStorePaths[0])
		o.XenStoreRead = func(context.Context, string) error { return nil }
		want(t, checkXenStore(ctx, o), true, Required, "answers")
	})
	t.Run("real client, fake xenstored", func(t *testing.T) {
		o := fakeOptions(t)
		srv := xenstoretest.NewServer(t, xenstoretest.Options{})
		o.XenStorePaths = []string{srv.Socket}
		o.XenStoreRead = readXenStore // the node is absent: ENOENT still proves an answer
		want(t, checkXenStore(ctx, o), true, Required, "answers on "+srv.Socket)
	})
	t.Run("real client, silent peer", func(t *testing.T) {
		o := fakeOptions(t)
		listen(t, o.XenStorePaths[0]) // accepts and hangs up
		o.XenStoreRead = readXenStore
		want(t, checkXenStore(ctx, o), false, Required, "read /local/domain/0/name")
	})
}

func TestBlkback(t *testing.T) {
	o := fakeOptions(t)
	want(t, checkBlkback(o), false, Warning, "not loaded")
	mkdir(t, filepath.Join(o.SysBus, "xen-backend/drivers/vbd"))
	want(t, checkBlkback(o), true, Warning, "xen-backend/drivers/vbd")

	o = fakeOptions(t)
	mkdir(t, filepath.Join(o.SysModule, "xen_blkback"))
	want(t, checkBlkback(o), true, Warning, "xen_blkback")
}

func TestSystemdAndFDStore(t *testing.T) {
	ctx := context.Background()
	o := fakeOptions(t)
	want(t, checkSystemd(o), false, Warning, "not running under systemd")
	want(t, checkFDStore(ctx, o), false, Info, "systemd is not PID 1")

	mkdir(t, o.SystemdDir)
	want(t, checkSystemd(o), true, Warning, "PID 1")

	tests := []struct {
		name   string
		out    string
		err    error
		ok     bool
		sev    Severity
		detail string
	}{
		{"configured", "LoadState=loaded\nFileDescriptorStoreMax=4096\nNFileDescriptorStore=3\n", nil, true, Warning, "FileDescriptorStoreMax=4096, NFileDescriptorStore=3"},
		{"old systemd", "LoadState=loaded\nFileDescriptorStoreMax=4096\n", nil, true, Warning, "FileDescriptorStoreMax=4096"},
		{"no fd store", "LoadState=loaded\nFileDescriptorStoreMax=0\nNFileDescriptorStore=0\n", nil, false, Warning, "FileDescriptorStoreMax=0"},
		{"full", "LoadState=loaded\nFileDescriptorStoreMax=2\nNFileDescriptorStore=2\n", nil, false, Warning, "full"},
		{"not installed", "LoadState=not-found\nFileDescriptorStoreMax=0\n", nil, false, Warning, "not-found"},
		{"systemctl fails", "", errors.New("exit status 1"), false, Info, "cannot be checked"},
		{"garbage", "hello\n", nil, false, Info, "cannot be checked"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var gotArgs []string
			o.Systemctl = func(_ context.Context, args ...string) ([]byte, error) {
				gotArgs = args
				return []byte(tt.out), tt.err
			}
			want(t, checkFDStore(ctx, o), tt.ok, tt.sev, tt.detail)
			if gotArgs[0] != "show" || gotArgs[len(gotArgs)-1] != DefaultUnit {
				t.Errorf("systemctl args = %q, want show ... %s", gotArgs, DefaultUnit)
			}
		})
	}
}

func TestDaemon(t *testing.T) {
	ctx := context.Background()
	o := fakeOptions(t)
	c := checkDaemon(ctx, o)
	want(t, c, false, Required, "no such file")
	if !strings.Contains(c.Fix, "systemctl enable --now") {
		t.Errorf("fix = %q, want systemctl enable --now", c.Fix)
	}
	staleSocket(t, o.Socket)
	c = checkDaemon(ctx, o)
	want(t, c, false, Required, "connection refused")
	if !strings.Contains(c.Fix, "stale socket") {
		t.Errorf("fix = %q, want it to mention the stale socket", c.Fix)
	}
	os.Remove(o.Socket)
	listen(t, o.Socket)
	want(t, checkDaemon(ctx, o), true, Required, "listening on "+o.Socket)
}

func TestDaemonSocketFromEnv(t *testing.T) {
	t.Setenv("XENBLKD_SOCKET", "/somewhere/api.sock")
	if got := (Options{}).withDefaults().Socket; got != "/somewhere/api.sock" {
		t.Errorf("Socket = %q, want $XENBLKD_SOCKET", got)
	}
	t.Setenv("XENSTORED_PATH", "/x/socket")
	if got := (Options{}).withDefaults().XenStorePaths; len(got) != 1 || got[0] != "/x/socket" {
		t.Errorf("XenStorePaths = %q, want only $XENSTORED_PATH", got)
	}
}

func TestStaleLoops(t *testing.T) {
	o := fakeOptions(t)
	want(t, checkStaleLoops(o), false, Info, "cannot be checked")
	o.Held = nil

	// loop0: ours; loop1: someone else's; loop2: unbound; loop10: ours.
	tags := map[string]string{"loop0": "xenblkd:/img/a", "loop1": "/srv/other.img", "loop10": "xenblkd:/img/b"}
	for _, name := range []string{"loop0", "loop1", "loop10"} {
		writeFile(t, filepath.Join(o.SysBlock, name, "loop", "backing_file"), "/img/"+name+"\n")
	}
	mkdir(t, filepath.Join(o.SysBlock, "loop2"))
	mkdir(t, filepath.Join(o.SysBlock, "sda"))
	o.LoopTag = func(dev string) (string, error) {
		if tag, ok := tags[filepath.Base(dev)]; ok {
			return tag, nil
		}
		return "", unix.ENXIO
	}

	got, err := ScanTagged(o)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Number != 0 || got[1].Number != 10 || got[1].Backing != "/img/loop10" ||
		got[0].Path != filepath.Join(o.DevDir, "loop0") {
		t.Fatalf("ScanTagged = %+v, want loop0 and loop10", got)
	}

	want(t, checkStaleLoops(o), false, Info, "cannot tell which the daemon holds")
	o.Held = func() (map[int]bool, error) { return nil, errors.New("daemon down") }
	want(t, checkStaleLoops(o), false, Info, "daemon down")
	o.Held = func() (map[int]bool, error) { return map[int]bool{0: true, 10: true}, nil }
	want(t, checkStaleLoops(o), true, Warning, "all held")
	o.Held = func() (map[int]bool, error) { return map[int]bool{0: true}, nil }
	c := checkStaleLoops(o)
	want(t, c, false, Warning, "1 loop device(s)")
	if !strings.Contains(c.Detail, "loop10") || strings.Contains(c.Detail, "loop0 ") {
		t.Errorf("detail = %q, want only loop10", c.Detail)
	}
}

func TestKernelAtLeast(t *testing.T) {
	tests := []struct {
		release string
		want    [2]int
		ok      bool
	}{
		{"6.1.0-28-amd64", [2]int{5, 15}, true},
		{"5.15.0", [2]int{5, 15}, true},
		{"5.10.0-30-amd64", [2]int{5, 15}, false},
		{"4.19.0", [2]int{5, 8}, false},
		{"5.8.0", [2]int{5, 8}, true},
		{"weird", [2]int{5, 8}, true},
	}
	for _, tt := range tests {
		if got := kernelAtLeast(tt.release, tt.want); got != tt.ok {
			t.Errorf("kernelAtLeast(%q, %v) = %v, want %v", tt.release, tt.want, got, tt.ok)
		}
	}
}

func TestRenderAndExitStatus(t *testing.T) {
	checks := []Check{
		{Name: "a", OK: true, Severity: Required, Detail: "fine"},
		{Name: "b", OK: false, Severity: Warning, Detail: "meh", Fix: "do b"},
		{Name: "c", OK: false, Severity: Info, Detail: "cannot be checked"},
	}
	if got := ExitStatus(checks); got != 0 {
		t.Errorf("ExitStatus with a warning = %d, want 0", got)
	}
	var buf bytes.Buffer
	Render(&buf, checks)
	for _, s := range []string{"ok      a", "WARN    b", "fix: do b", "skip    c", "xenblkd can run"} {
		if !strings.Contains(buf.String(), s) {
			t.Errorf("table lacks %q:\n%s", s, buf.String())
		}
	}
	checks = append(checks, Check{Name: "d", Severity: Required, Detail: "broken", Fix: "do d"})
	if got := ExitStatus(checks); got != 1 {
		t.Errorf("ExitStatus with a failed required check = %d, want 1", got)
	}
	buf.Reset()
	Render(&buf, checks)
	if !strings.Contains(buf.String(), "until these are fixed: d\n") {
		t.Errorf("table lacks the verdict:\n%s", buf.String())
	}
}

func TestMainWith(t *testing.T) {
	ctx := context.Background()
	o := fakeOptions(t)
	o.LoopControl = "/dev/null"
	listen(t, o.XenStorePaths[0])
	listen(t, o.Socket)

	var buf bytes.Buffer
	if code := MainWith(ctx, &buf, &buf, []string{"--json"}, *o); code != 0 {
		t.Errorf("exit status = %d, want 0\n%s", code, buf.String())
	}
	var r Report
	if err := json.Unmarshal(buf.Bytes(), &r); err != nil || !r.OK || len(r.Checks) != 13 {
		t.Errorf("--json: got %+v (%v), want ok with 13 checks", r, err)
	}

	buf.Reset()
	if code := MainWith(ctx, &buf, &buf, []string{"--socket", o.Socket + ".missing"}, *o); code != 1 {
		t.Errorf("exit status without the daemon = %d, want 1\n%s", code, buf.String())
	}
	if !strings.Contains(buf.String(), "FAIL    daemon") {
		t.Errorf("table lacks the daemon failure:\n%s", buf.String())
	}

	for _, args := range [][]string{{"--bogus"}, {"extra"}} {
		buf.Reset()
		if code := MainWith(ctx, &buf, &buf, args, *o); code != 2 {
			t.Errorf("args %q: exit status = %d, want 2", args, code)
		}
	}
	buf.Reset()
	if code := MainWith(ctx, &buf, &buf, []string{"--help"}, *o); code != 0 || !strings.HasPrefix(buf.String(), "NAME\n    xenblkd doctor - ") {
		t.Errorf("--help: exit status %d, output %q", code, buf.String())
	}
}
