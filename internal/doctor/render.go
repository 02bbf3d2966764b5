package doctor

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Status is the word printed for a check: ok, FAIL (required), WARN, or
// skip (an Info check that could not be done).
func (c Check) Status() string {
	switch {
	case c.OK:
		return "ok"
	case c.Severity == Required:
		return "FAIL"
	case c.Severity == Warning:
		return "WARN"
	default:
		return "skip"
	}
}

// Render writes checks as a table, each failure followed by its fix, then a
// one-line verdict.
func Render(w io.Writer, checks []Check) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "STATUS\tCHECK\tDETAIL")
	for _, c := range checks {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", c.Status(), c.Name, oneLine(c.Detail))
		if !c.OK && c.Fix != "" {
			fmt.Fprintf(tw, "\t\tfix: %s\n", oneLine(c.Fix))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	var failed []string
	for _, c := range checks {
		if !c.OK && c.Severity == Required {
			failed = append(failed, c.Name)
		}
	}
	var err error
	if len(failed) == 0 {
		_, err = fmt.Fprintln(w, "\nxenblkd can run on this host.")
	} else {
		_, err = fmt.Fprintf(w, "\nxenblkd cannot run on this host until these are fixed: %s\n", strings.Join(failed, ", "))
	}
	return err
}

// Report is the --json output.
type Report struct {
	OK     bool    `json:"ok"` // every required check passed
	Checks []Check `json:"checks"`
}

// RenderJSON writes checks as one JSON Report.
func RenderJSON(w io.Writer, checks []Check) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(Report{OK: ExitStatus(checks) == 0, Checks: checks})
}

func oneLine(s string) string { return strings.ReplaceAll(s, "\n", " ") }

// Main is `xenblkd doctor [--json] [--socket PATH]`: it runs every check,
// prints the result and returns the exit status: 0 when xenblkd can run, 1 when
// a required check failed, 2 on a usage error.
func Main(ctx context.Context, stdout, stderr io.Writer, args []string) int {
	return MainWith(ctx, stdout, stderr, args, Options{})
}

// Usage is the text of `xenblkd doctor --help`.
const Usage = `NAME
    xenblkd doctor - check what this host offers xenblkd and say what to fix

SYNOPSIS
    xenblkd doctor [--json] [--socket PATH]

DESCRIPTION
    Runs every check and prints one line each: ok, FAIL (xenblkd cannot
    attach disks until it is fixed), WARN (it works, less safely or less
    well) or skip, with what to do. The checks: the Xen hypervisor, the loop
    API (loop-control, LOOP_CONFIGURE with a 4 KiB read-only probe device,
    released at once; diskseq), XenStore (xenstored's socket or the xenbus
    device, and that it answers), xen-blkback, systemd and the unit's fd
    store, whether the unit's ExecStart= flags agree with the running
    daemon's, the /etc/xen/scripts/xenblkd link, the daemon's API socket,
    loop devices tagged by xenblkd that no daemon holds, and in cluster mode
    the sanlock daemon, this host's place in the lockspace and the lease
    directory (docs/cluster.md). Doctor changes nothing on the host but
    that probe device (and a probe file in the lease directory).

    --json prints {"ok", "checks": [{"name", "ok", "severity", "detail",
    "fix"}...]} for scripts.

OPTIONS
    --json          print JSON
    --socket PATH   API socket (default $XENBLKD_SOCKET, else /run/xenblkd/api.sock)

EXIT STATUS
    0 every required check passed, 1 one failed, 2 usage error.
`

// MainWith is Main with preset Options; flags override them. A nil Held asks
// the daemon at the socket (HeldByDaemon).
func MainWith(ctx context.Context, stdout, stderr io.Writer, args []string, opts Options) int {
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	jsonOut := fs.Bool("json", false, "print the checks as JSON")
	fs.StringVar(&opts.Socket, "socket", opts.Socket, "daemon API socket")
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stdout, Usage)
		return 0
	}
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err != nil {
		fmt.Fprintf(stderr, "xenblkd doctor: %v (see xenblkd doctor --help)\n", err)
		return 2
	}
	if opts.Held == nil {
		opts.Held = HeldByDaemon(opts.withDefaults().Socket)
	}
	checks := Run(ctx, opts)
	render := Render
	if *jsonOut {
		render = RenderJSON
	}
	if err := render(stdout, checks); err != nil {
		return 1
	}
	return ExitStatus(checks)
}
