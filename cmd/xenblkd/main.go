// Command xenblkd attaches Xen VM disks without the bash block script.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "xenblkd: not yet implemented")
	os.Exit(1)
}
