package doctor

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/testenv"
)

func needRoot(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t, "loop devices")
	if _, err := os.Stat(DefaultLoopControl); err != nil {
		testenv.Skip(t, "no "+DefaultLoopControl+" (a kernel without loop devices)")
	}
}

// TestIntegrationLoopChecks runs the loop checks against this host's kernel.
func TestIntegrationLoopChecks(t *testing.T) {
	needRoot(t)
	o := Options{}.withDefaults()
	o.TempDir = t.TempDir()
	want(t, checkLoopControl(&o), true, Required, "opened read-write")
	p := probeLoop(&o)
	want(t, checkLoopConfigure(&o, p), true, Required, "bound /dev/loop")
	want(t, checkDiskSeq(&o, p), true, Required, "BLKGETDISKSEQ")

	// The probe released its device: it is unbound now (AUTOCLEAR), or
	// already bound by someone else with another tag.
	// (udev may hold it open a moment longer: wait for that.)
	for i := 0; ; i++ {
		tag, err := loopTag(p.Device)
		if err != nil || tag != probeTag {
			break
		}
		if i == 50 {
			t.Fatalf("%s still bound to the probe 1s after probeLoop returned", p.Device)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The probe's backing file is gone.
	if left, _ := filepath.Glob(filepath.Join(o.TempDir, "*")); len(left) != 0 {
		t.Errorf("probe left files: %q", left)
	}
}

// TestIntegrationStaleLoops binds a tagged device the "daemon" does not hold
// and checks that stale-loops finds it, then not once it is held.
func TestIntegrationStaleLoops(t *testing.T) {
	needRoot(t)
	prefix := fmt.Sprintf("xenblkd-test:doctor-%d:", os.Getpid())
	dev := attachTagged(t, prefix+"stale")

	o := Options{TagPrefix: prefix}.withDefaults()
	tagged, err := ScanTagged(&o)
	if err != nil {
		t.Fatal(err)
	}
	if len(tagged) != 1 || tagged[0].Path != dev.path || tagged[0].Tag != prefix+"stale" {
		t.Fatalf("ScanTagged = %+v, want only %s", tagged, dev.path)
	}
	o.Held = func() (map[int]bool, error) { return map[int]bool{}, nil }
	want(t, checkStaleLoops(&o), false, Warning, dev.path)
	o.Held = func() (map[int]bool, error) { return map[int]bool{dev.number: true}, nil }
	want(t, checkStaleLoops(&o), true, Warning, "all held")
}

type testLoop struct {
	path   string
	number int
}

// attachTagged binds a read-only AUTOCLEAR loop device with tag and holds its
// fd until the test ends; closing that fd frees the device.
func attachTagged(t *testing.T, tag string) testLoop {
	t.Helper()
	backing := filepath.Join(t.TempDir(), "backing")
	if err := os.WriteFile(backing, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(backing)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctl, err := unix.Open(DefaultLoopControl, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(ctl)
	var cfg unix.LoopConfig
	cfg.Fd = uint32(f.Fd())
	cfg.Info.Flags = unix.LO_FLAGS_READ_ONLY | unix.LO_FLAGS_AUTOCLEAR
	copy(cfg.Info.File_name[:], tag)
	for range 8 {
		n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			t.Fatal(err)
		}
		path := fmt.Sprintf("/dev/loop%d", n)
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.IoctlLoopConfigure(fd, &cfg); err != nil {
			unix.Close(fd)
			if err == unix.EBUSY {
				continue
			}
			t.Fatalf("LOOP_CONFIGURE %s: %v", path, err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return testLoop{path: path, number: n}
	}
	t.Fatal("no free loop device after 8 tries")
	return testLoop{}
}

// TestIntegrationRun runs every check on this host: whatever the host lacks,
// Run must not panic, must name every check, and the loop checks must pass.
func TestIntegrationRun(t *testing.T) {
	needRoot(t)
	o := Options{TempDir: t.TempDir(), Socket: filepath.Join(t.TempDir(), "none.sock")}
	checks := Run(context.Background(), o)
	names := map[string]Check{}
	for _, c := range checks {
		names[c.Name] = c
	}
	for _, n := range []string{NameLoopControl, NameLoopConfigure, NameDiskSeq, NameXenStore, NameBlkback,
		NameSystemd, NameFDStore, NameDaemon, NameStaleLoops, NameHypervisor, NameScriptLink, NameUnitFlags} {
		if _, ok := names[n]; !ok {
			t.Errorf("Run did not run %s", n)
		}
	}
	for _, n := range []string{NameLoopControl, NameLoopConfigure, NameDiskSeq} {
		if c := names[n]; !c.OK {
			t.Errorf("%s failed on this host: %s", n, c.Detail)
		}
	}
	if c := names[NameDaemon]; c.OK || ExitStatus(checks) != 1 {
		t.Errorf("daemon check with a missing socket: OK=%v, exit status %d; want a failure and 1", c.OK, ExitStatus(checks))
	}
}
