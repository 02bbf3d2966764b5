package main

import "xenblkd/test/xenstored"

// startXenstored starts the project's private real C xenstored (test/xenstored:
// Debian's cxenstored under the LD_PRELOAD shim, its own socket, never the
// host's). stop kills it by pid and removes its directory.
func startXenstored() (d *xenstored.Daemon, stop func(), err error) {
	return xenstored.StartMain(xenstored.C)
}
