package xenstored

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"xenblkd/internal/testenv"
	"xenblkd/internal/xenstore"
	"xenblkd/test/trixie"
)

// TestDaemon starts each kind, the host's (Debian 12: Xen 4.17) and Debian
// 13's (Xen 4.20, in the trixie root), talks to it with the real xenstore-*
// tools (an independent client), sets permissions naming another domain
// (4.20's daemons ask the hypervisor whether it exists: the shim answers),
// restarts it and checks it is killed by pid.
func TestDaemon(t *testing.T) {
	for _, root := range []string{"", "trixie"} {
		for _, kind := range []Kind{C, OCaml} {
			t.Run(string(kind)+"/"+rootName(root), func(t *testing.T) {
				testDaemon(t, kind, root)
			})
		}
	}
}

// rootName names a root in a test's name: "host" or "trixie".
func rootName(root string) string {
	if root == "" {
		return "host"
	}
	return root
}

func testDaemon(t *testing.T, kind Kind, root string) {
	if root == "trixie" {
		var err error
		if root, err = trixie.Root(); err != nil {
			testenv.Skip(t, err.Error())
		}
	}
	d := StartIn(t, kind, root)
	t.Logf("%s from Xen %s (root %q)", kind, d.XenVersion, d.Root)
	run := func(args ...string) string {
		t.Helper()
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = append(os.Environ(), d.Env()...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	run("xenstore-write", "xbtest/a", "1")
	if got := run("xenstore-read", "/local/domain/0/xbtest/a"); got != "1" {
		t.Errorf("read back: got %q, want %q", got, "1")
	}
	if got, want := run("xenstore-read", "/tool/xenstored"), ""; kind == OCaml && got == want {
		t.Errorf("/tool/xenstored is empty on oxenstored")
	}
	run("xenstore-chmod", "xbtest/a", "n0", "r5")
	if got := run("xenstore-ls", "-p", "xbtest"); !strings.Contains(got, "(n0,r5)") {
		t.Errorf("permissions after xenstore-chmod n0 r5: %q", got)
	}

	old := d.Pid
	if err := d.Restart(); err != nil {
		t.Fatal(err)
	}
	if d.Pid == old {
		t.Errorf("Restart kept pid %d", old)
	}
	if err := syscall.Kill(old, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("old daemon pid %d still exists after Restart: %v", old, err)
	}
	c, err := xenstore.DialUnix(context.Background(), d.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Read(context.Background(), "xbtest/a"); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("read after restart: got %v, want ENOENT (fresh store)", err)
	}
	if got, err := c.Read(context.Background(), "name"); err != nil || got != "Domain-0" {
		t.Errorf("read name: got %q, %v; want Domain-0", got, err)
	}
	if err := d.Kill(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(d.Pid)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("daemon pid %d survives Kill", d.Pid)
	}
}
