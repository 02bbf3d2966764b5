package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"xenblkd/internal/api"
)

const statusUsage = `NAME
    xenblkd status - list the daemon's attachments and loop devices

SYNOPSIS
    xenblkd status [--json] [--socket PATH]

DESCRIPTION
    Prints one line per attached backend: domain id and name, vdev, target
    (params), mode, loop or block device, diskseq, the loop device's I/O mode
    (IO: direct or buffered I/O to the image file, then the logical block size
    the guest sees, e.g. direct/512; "-" for a block device), how many
    backends use that device (read-only images share one loop device) and
    since when. Then the
    loop devices the daemon holds for no backend: normally none, and it says
    so. A name or vdev that XenStore does not have (or, in a driver domain,
    does not let it read) shows as "-".

    --json prints one object for scripts, with stable field names:
      {"attachments": [{"domid", "domain_name", "devid", "vdev", "target",
        "kind", "mode", "device", "physical_device", "diskseq", "io",
        "block_size", "users", "since"}...],
       "unused_loop_devices": [{"device", "physical_device", "diskseq"}...],
       "leases": [{"name", "identity", "target", "mode", "users",
        "since"}...]}
    leases is there in cluster mode only (docs/cluster.md): the sanlock
    leases this host holds, mode "exclusive", "shared" or "pending" (a
    migration's destination waiting for the source host to let go).
    domain_name, vdev, diskseq and since are left out when unknown, io
    ("direct" or "buffered") and block_size for block devices; since is
    RFC 3339. See docs/usage.md.

OPTIONS
    --json          print JSON
    --socket PATH   API socket (default $XENBLKD_SOCKET, else /run/xenblkd/api.sock)

EXIT STATUS
    0 the daemon answered, 1 it could not be reached, 2 usage error.
`

// StatusJSON is the output of `xenblkd status --json`.
type StatusJSON struct {
	Attachments       []api.Attachment `json:"attachments"`
	UnusedLoopDevices []api.LoopDevice `json:"unused_loop_devices"`
	Leases            []api.Lease      `json:"leases,omitempty"` // cluster mode only
}

func runStatus(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print JSON")
	socket := fs.String("socket", socketPath(), "API socket")
	if code, ok := parseFlags(fs, args, statusUsage, stdout, stderr, 2); !ok {
		return code
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := api.Call(ctx, *socket, api.Request{Op: api.OpStatus})
	if err == nil && !resp.OK {
		err = errors.New(resp.Error)
	}
	if err != nil {
		fmt.Fprintln(stderr, "xenblkd status:", err)
		return 1
	}
	out := StatusJSON{Attachments: resp.Attachments, UnusedLoopDevices: resp.UnusedLoopDevices, Leases: resp.Leases}
	if out.Attachments == nil {
		out.Attachments = []api.Attachment{}
	}
	if out.UnusedLoopDevices == nil {
		out.UnusedLoopDevices = []api.LoopDevice{}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(out); err != nil {
			return 1
		}
		return 0
	}
	writeStatusTable(stdout, out, time.Now())
	return 0
}

// writeStatusTable writes the human-readable status.
func writeStatusTable(w io.Writer, s StatusJSON, now time.Time) {
	if len(s.Attachments) == 0 {
		fmt.Fprintln(w, "No attachments.")
	} else {
		tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
		fmt.Fprintln(tw, "DOMID\tNAME\tVDEV\tTARGET\tMODE\tDEVICE\tDISKSEQ\tIO\tUSERS\tSINCE")
		for _, a := range s.Attachments {
			seq := "-"
			if a.DiskSeq != 0 {
				seq = strconv.FormatUint(a.DiskSeq, 10)
			}
			io := "-"
			if a.IO != "" {
				io = cell(a.IO) + "/" + strconv.FormatUint(uint64(a.BlockSize), 10)
			}
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", a.Domid, cell(a.DomainName), cell(a.Vdev),
				cell(a.Target), a.Mode, cell(a.Device), seq, io, a.Users, since(a.Since, now))
		}
		tw.Flush()
	}
	fmt.Fprintln(w)
	writeLeases(w, s.Leases, now)
	if len(s.UnusedLoopDevices) == 0 {
		fmt.Fprintln(w, "Loop devices held for no backend: none.")
		return
	}
	fmt.Fprintf(w, "Loop devices held for no backend: %d (a leak or a recovery leftover; see docs/troubleshooting.md)\n", len(s.UnusedLoopDevices))
	for _, d := range s.UnusedLoopDevices {
		fmt.Fprintf(w, "  %s  %s  diskseq %d\n", d.Device, d.PhysicalDevice, d.DiskSeq)
	}
}

// writeLeases lists cluster mode's leases (nothing outside cluster mode).
func writeLeases(w io.Writer, leases []api.Lease, now time.Time) {
	if len(leases) == 0 {
		return
	}
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "LEASE\tMODE\tUSERS\tTARGET\tIDENTITY\tSINCE")
	for _, l := range leases {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", l.Name, l.Mode, l.Users, cell(l.Target), cell(l.Identity), since(l.Since, now))
	}
	tw.Flush()
	fmt.Fprintln(w)
}

// cell makes a value safe for one table cell: "-" if empty, no tabs or
// control characters (a name or params comes from XenStore).
func cell(s string) string {
	if s == "" {
		return "-"
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return '?'
		}
		return r
	}, s)
}

// since shows the attach time in local time and how long ago.
func since(t, now time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04:05") + " (" + ago(now.Sub(t)) + ")"
}

func ago(d time.Duration) string {
	switch {
	case d < time.Minute:
		return strconv.Itoa(int(max(d, 0)/time.Second)) + "s"
	case d < time.Hour:
		return strconv.Itoa(int(d/time.Minute)) + "m"
	case d < 48*time.Hour:
		return strconv.Itoa(int(d/time.Hour)) + "h"
	}
	return strconv.Itoa(int(d/(24*time.Hour))) + "d"
}
