package daemon

import (
	"context"
	"testing"
	"time"
)

func TestStatusNamesAndSince(t *testing.T) {
	o := startObserved(t, "127.0.0.1:0")
	ctx := context.Background()
	img := writeImage(t, "web.img")
	before := time.Now()
	be1 := o.backend(t, 7, 51712, img, "r")
	be2 := o.backend(t, 8, 51728, img, "r")
	// Domain 7 has a name and its backend a vdev; domain 8 has neither.
	if err := o.xs.Write(ctx, "/local/domain/7/name", "web"); err != nil {
		t.Fatal(err)
	}
	if err := o.xs.Write(ctx, be1+"/dev", "xvda"); err != nil {
		t.Fatal(err)
	}
	for _, be := range []string{be1, be2} {
		if resp := o.call(t, "add", be); !resp.OK {
			t.Fatalf("add %s: %+v", be, resp)
		}
	}
	st := o.call(t, "status", "")
	if !st.OK || len(st.Attachments) != 2 || len(st.UnusedLoopDevices) != 0 {
		t.Fatalf("status: %+v", st)
	}
	a, b := st.Attachments[0], st.Attachments[1]
	if a.Domid != 7 || a.DomainName != "web" || a.Vdev != "xvda" || a.Users != 2 || a.Device != b.Device {
		t.Errorf("first attachment: %+v", a)
	}
	if b.Domid != 8 || b.DomainName != "" || b.Vdev != "" {
		t.Errorf("second attachment (no name, no dev node): %+v", b)
	}
	for _, x := range st.Attachments {
		if x.Since.Before(before.Add(-time.Second)) || x.Since.After(time.Now()) {
			t.Errorf("domain %d: since %v, want between %v and now", x.Domid, x.Since, before)
		}
	}
}
