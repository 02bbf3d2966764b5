package systemd_test

import (
	"testing"

	"xenblkd/internal/testenv"
	"xenblkd/test/trixie"
)

// eachRelease runs test as two subtests: "host", with the host's systemd
// (Debian 12: 252; root ""), and "trixie", with Debian 13's (257) from the
// cached trixie root.
func eachRelease(t *testing.T, test func(t *testing.T, root string)) {
	for _, release := range []string{"host", "trixie"} {
		t.Run(release, func(t *testing.T) {
			root := ""
			if release == "trixie" {
				var err error
				if root, err = trixie.Root(); err != nil {
					testenv.Skip(t, err.Error())
				}
			}
			test(t, root)
		})
	}
}
