// Package build builds the xenblkd binary (static, CGO_ENABLED=0) and the C
// hotplug entry as they are shipped, for the tests that exec them as libxl
// would.
package build

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Xenblkd builds cmd/xenblkd into dir and returns the binary's path.
func Xenblkd(dir string) (string, error) {
	binary := filepath.Join(dir, "xenblkd")
	cmd := exec.Command("go", "build", "-trimpath", "-o", binary, "xenblkd/cmd/xenblkd")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build xenblkd: %v\n%s", err, out)
	}
	return binary, nil
}

// EntrySource is the C hotplug entry, relative to the module root.
const EntrySource = "cmd/xenblkd-hotplug/xenblkd-hotplug.c"

// EntryCFlags are the compiler flags of the shipped entry (the Makefile's
// ENTRY_CFLAGS; keep the two the same).
var EntryCFlags = []string{"-std=c11", "-O2", "-static", "-Wall", "-Wextra", "-Wpedantic", "-Wshadow", "-Wconversion", "-Werror"}

// SanitizerCFlags build the entry with AddressSanitizer and
// UndefinedBehaviorSanitizer. ASan needs its runtime library, so this build
// is dynamic; any finding aborts the program (exit status 1 is not enough:
// -fno-sanitize-recover).
var SanitizerCFlags = []string{"-std=c11", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
	"-fno-omit-frame-pointer", "-Wall", "-Wextra", "-Werror"}

// Entry builds the C hotplug entry with cflags into dir/name, handing over
// to goBinary (built in as XENBLKD_BIN), and returns its path.
func Entry(dir, name, goBinary string, cflags []string) (string, error) {
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, name)
	args := append(append([]string{}, cflags...), fmt.Sprintf(`-DXENBLKD_BIN="%s"`, goBinary), "-o", out, filepath.Join(root, EntrySource))
	if b, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("build the C hotplug entry (gcc %v): %v\n%s", args, err, b)
	}
	return out, nil
}

// moduleRoot is the directory of go.mod.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("find the module root: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out))), nil
}

// SanitizedEntry reports whether TestEntry builds the C entry with
// sanitizers ($XENBLKD_TEST_ENTRY=sanitize): make test-unit's second run of
// the end-to-end tests, which is there for the entry.
func SanitizedEntry() bool { return os.Getenv("XENBLKD_TEST_ENTRY") == "sanitize" }

// TestEntry builds the C hotplug entry for a test suite that execs it as
// libxl does: with EntryCFlags, or with SanitizerCFlags when
// $XENBLKD_TEST_ENTRY is "sanitize" (make test-unit runs the end-to-end
// tests both ways).
func TestEntry(dir, goBinary string) (string, error) {
	switch v := os.Getenv("XENBLKD_TEST_ENTRY"); v {
	case "":
		return Entry(dir, "xenblkd-hotplug", goBinary, EntryCFlags)
	case "sanitize":
		return Entry(dir, "xenblkd-hotplug", goBinary, SanitizerCFlags)
	default:
		return "", fmt.Errorf("XENBLKD_TEST_ENTRY=%q: want unset or sanitize", v)
	}
}
