package main

import (
	"strings"
	"testing"
	"time"

	"xenblkd/internal/api"
)

func TestStatusTable(t *testing.T) {
	now := time.Date(2026, 11, 27, 12, 0, 0, 0, time.Local)
	s := StatusJSON{
		Attachments: []api.Attachment{
			{Domid: 3, DomainName: "web", Vdev: "xvda", Devid: 51712, Target: "/srv/vm/web.img", Mode: "w", Device: "/dev/loop4",
				DiskSeq: 88, IO: "direct", BlockSize: 512, Users: 1, Since: now.Add(-3 * time.Hour)},
			{Domid: 4, Devid: 51728, Target: "/dev/vg0/x\tevil\n", Mode: "w", Device: "/dev/vg0/x", Users: 1},
		},
	}
	var b strings.Builder
	writeStatusTable(&b, s, now)
	want := `DOMID  NAME  VDEV  TARGET            MODE  DEVICE      DISKSEQ  IO          USERS  SINCE
3      web   xvda  /srv/vm/web.img   w     /dev/loop4  88       direct/512  1      2026-11-27 09:00:00 (3h)
4      -     -     /dev/vg0/x?evil?  w     /dev/vg0/x  -        -           1      -

Loop devices held for no backend: none.
`
	if got := b.String(); got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}

	b.Reset()
	writeStatusTable(&b, StatusJSON{UnusedLoopDevices: []api.LoopDevice{{Device: "/dev/loop9", PhysicalDevice: "7:9", DiskSeq: 12}}}, now)
	want = `No attachments.

Loop devices held for no backend: 1 (a leak or a recovery leftover; see docs/troubleshooting.md)
  /dev/loop9  7:9  diskseq 12
`
	if got := b.String(); got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}

	// Cluster mode: the leases between the two.
	b.Reset()
	writeStatusTable(&b, StatusJSON{Leases: []api.Lease{{Name: "xb-0123", Identity: "file:pool/web.img", Target: "/srv/pool/web.img",
		Mode: "pending", Users: 1, Since: now.Add(-2 * time.Minute)}}}, now)
	want = `No attachments.

LEASE    MODE     USERS  TARGET             IDENTITY           SINCE
xb-0123  pending  1      /srv/pool/web.img  file:pool/web.img  2026-11-27 11:58:00 (2m)

Loop devices held for no backend: none.
`
	if got := b.String(); got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
}
