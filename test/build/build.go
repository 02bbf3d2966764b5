// Package build builds the xenblkd binary as it is shipped (static,
// CGO_ENABLED=0) for the tests that exec it as libxl would.
package build

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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
