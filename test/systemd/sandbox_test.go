package systemd

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBoot boots a sandbox with one oneshot unit and checks that it ran, that
// the sandbox is isolated from the host's /tmp, /run and /dev, and that the
// cgroup is gone afterwards.
func TestBoot(t *testing.T) {
	shared := t.TempDir()
	hostOnly, err := os.CreateTemp("", "xenblkd-test-hostonly-")
	if err != nil {
		t.Fatal(err)
	}
	hostOnly.Close()
	t.Cleanup(func() { os.Remove(hostOnly.Name()) })
	sbx := Start(t, Options{
		Units: map[string]string{
			"boot-test.target": "[Unit]\nDefaultDependencies=no\nWants=boot-test.service\n",
			"boot-test.service": "[Unit]\nDefaultDependencies=no\n[Service]\nType=oneshot\nRemainAfterExit=yes\n" +
				"ExecStart=/bin/sh -c 'echo \"$XENBLKD_TEST_VAR\" > " + shared + "/ran; ls /tmp > " + shared + "/tmp-listing'\n",
		},
		Target: "boot-test.target",
		Binds:  []Bind{{Path: shared}},
		Env:    []string{"XENBLKD_TEST_VAR=hello world"},
	})
	got, err := os.ReadFile(filepath.Join(shared, "ran"))
	if err != nil || string(got) != "hello world\n" {
		t.Fatalf("unit output: got %q, %v; want %q", got, err, "hello world\n")
	}
	// The sandbox's /tmp holds only the bound dirs' parents.
	if listing, _ := os.ReadFile(filepath.Join(shared, "tmp-listing")); strings.Contains(string(listing), filepath.Base(hostOnly.Name())) {
		t.Errorf("the sandbox's /tmp is the host's: %q", listing)
	}
	if _, err := os.Stat(hostOnly.Name()); err != nil {
		t.Errorf("host /tmp file gone after boot: %v", err)
	}
	dry, _ := os.ReadFile(filepath.Join(sbx.Dir(), "dryrun.txt"))
	t.Logf("dry run jobs: %q", dryRunJob.FindAllString(string(dry), -1))
	if out, err := sbx.Exec("readlink", "/proc/1/exe"); err != nil || strings.TrimSpace(out) != "/usr/lib/systemd/systemd" {
		t.Errorf("sandbox PID 1 is %q, %v; want systemd", out, err)
	}
	if out, err := sbx.Exec("ls", "/dev/loop-control"); err != nil {
		t.Errorf("/dev/loop-control missing in the sandbox: %s %v", out, err)
	}
	if state, err := sbx.Show("boot-test.service", "ActiveState"); state != "active" {
		t.Errorf("boot-test.service is %q, %v", state, err)
	}
	cgroup := sbx.cgroup
	sbx.Close()
	if _, err := os.Stat(cgroup); !os.IsNotExist(err) {
		t.Errorf("cgroup %s still exists after Close: %v", cgroup, err)
	}
}

func TestCheckDryRun(t *testing.T) {
	units := map[string]string{"a.target": "", "a.service": ""}
	ok := "-> Job 1:\n\tAction: a.target -> start\n-> Job 2:\n\tAction: a.service -> start\n"
	if err := checkDryRun([]byte(ok), units); err != nil {
		t.Errorf("own jobs refused: %v", err)
	}
	bad := ok + "-> Job 3:\n\tAction: systemd-tmpfiles-setup.service -> start\n"
	if err := checkDryRun([]byte(bad), units); err == nil || !strings.Contains(err.Error(), "tmpfiles") {
		t.Errorf("foreign job accepted: %v", err)
	}
	if err := checkDryRun([]byte("garbage"), units); err == nil {
		t.Error("output without jobs accepted")
	}
}
