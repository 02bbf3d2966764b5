package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"xenblkd/internal/api"
	"xenblkd/internal/takeover"
)

const takeoverUsage = `NAME
    xenblkd takeover - serve as Xen's block script, or give it back

SYNOPSIS
    xenblkd takeover [--root DIR] [--socket PATH] [--no-adopt]
    xenblkd takeover --undo [--root DIR]
    xenblkd takeover --status [--root DIR]

DESCRIPTION
    libxl runs /etc/xen/scripts/block for every disk whose specification
    names no script (and for every disk upstream libvirt starts). takeover
    makes that xenblkd: the stock script is diverted with dpkg-divert to
    /etc/xen/scripts/block.xenblkd-orig (package xenblkd; upgrades of
    xen-utils-common then update it there), and /etc/xen/scripts/block
    becomes a link to the file /etc/xen/scripts/xenblkd resolves to. The
    daemon recognises the taken-over block as its own (same file). The other
    scripts (block-iscsi, block-drbd, ...) are not touched.

    Then the running daemon is asked to adopt the loop devices the stock
    script made for domains that are running (each verified: node,
    physical-device and the backing file against params; then made
    AUTOCLEAR and held), so their removes free them and the sharing rules
    count them. A daemon that is not running does the same when it starts.

    --undo restores the stock script. Disks xenblkd attached stay attached;
    the daemon releases each when its domain goes: keep it running until
    "xenblkd status" is empty. Removing the xenblkd package undoes the
    takeover too.

    Both directions are idempotent. Each refuses, changing nothing, when it
    cannot be undone safely: block already diverted by another package or
    replaced by hand, the diverted copy missing or its name taken.

OPTIONS
    --undo          give block back to the stock script
    --status        print the state and exit (0 taken over, 3 not)
    --root DIR      act on the system under DIR (dpkg-divert --root; default
                    $DPKG_ROOT, as in a maintainer script, else /)
    --socket PATH   the daemon's API socket (default $XENBLKD_SOCKET, else
                    /run/xenblkd/api.sock)
    --no-adopt      do not ask the daemon to adopt the stock devices

EXIT STATUS
    0 done or nothing to do, 1 refused or failed, 2 usage error.
`

func runTakeover(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("takeover", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stdout, takeoverUsage) }
	undo := fs.Bool("undo", false, "give block back to the stock script")
	status := fs.Bool("status", false, "print the state")
	root := fs.String("root", os.Getenv("DPKG_ROOT"), "act on the system under DIR")
	socket := fs.String("socket", socketPath(), "API socket")
	noAdopt := fs.Bool("no-adopt", false, "do not ask the daemon to adopt the stock devices")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "xenblkd takeover: unexpected argument %q (see xenblkd takeover --help)\n", fs.Arg(0))
		return 2
	}
	c := takeover.Config{Root: *root}
	switch {
	case *status:
		s, err := c.Status()
		if err != nil {
			fmt.Fprintln(stderr, "xenblkd takeover:", err)
			return 1
		}
		if s.TakenOver() {
			fmt.Fprintf(stdout, "%s is xenblkd (link to %s; the stock script is %s)\n", takeover.Block, s.EntryTarget, s.DivertedTo)
			return 0
		}
		by := "not diverted"
		if s.DivertedBy != "" {
			by = "diverted by " + s.DivertedBy + " to " + s.DivertedTo
		}
		fmt.Fprintf(stdout, "%s is not xenblkd (%s)\n", takeover.Block, by)
		return 3
	case *undo:
		changed, err := c.Undo()
		if err != nil {
			fmt.Fprintln(stderr, "xenblkd takeover --undo: refused:", err)
			return 1
		}
		if !changed {
			fmt.Fprintf(stdout, "%s is not taken over by xenblkd: nothing to undo\n", takeover.Block)
			return 0
		}
		fmt.Fprintf(stdout, "%s is the stock script again. Disks xenblkd attached stay attached and are released as their domains go; "+
			"keep the daemon running until \"xenblkd status\" is empty.\n", takeover.Block)
		return 0
	}
	changed, err := c.Take()
	if err != nil {
		fmt.Fprintln(stderr, "xenblkd takeover: refused:", err)
		return 1
	}
	if changed {
		fmt.Fprintf(stdout, "%s is now xenblkd (the stock script is diverted to %s; xenblkd takeover --undo gives it back)\n",
			takeover.Block, takeover.Diverted)
	} else {
		fmt.Fprintf(stdout, "%s is xenblkd already\n", takeover.Block)
	}
	if *noAdopt {
		return 0
	}
	// As long as it takes: the daemon bounds each backend (api.Timeout).
	resp, err := api.Call(context.Background(), *socket, api.Request{Op: api.OpAdopt})
	switch {
	case errors.Is(err, api.ErrDaemonUnreachable):
		fmt.Fprintln(stdout, "The daemon is not running: every disk now needs it. Start it (systemctl start xenblkd); "+
			"it adopts the stock script's loop devices as it starts.")
	case err != nil:
		fmt.Fprintln(stderr, "xenblkd takeover: asking the daemon to adopt the stock script's devices:", err)
		return 1
	case !resp.OK:
		fmt.Fprintln(stderr, "xenblkd takeover: the daemon could not adopt the stock script's devices:", resp.Error)
		return 1
	default:
		fmt.Fprintln(stdout, "Daemon:", resp.Summary)
	}
	return 0
}
