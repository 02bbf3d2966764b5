package main_test

import (
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"xenblkd/internal/loop"
	"xenblkd/internal/testenv"
)

// TestIOModeEndToEnd: the daemon's --direct-io and a disk's own
// user.xenblkd.direct-io attribute decide each new loop device's I/O mode,
// the disk's attribute winning; status --json shows what is in effect; a
// bad attribute refuses the disk with the attribute named in hotplug-error
// and leaves no loop device.
func TestIOModeEndToEnd(t *testing.T) {
	d := startDaemon(t, xsd.Socket, "--direct-io=on")
	plain, _ := image(t, "io-plain.img")
	off, _ := image(t, "io-off.img")
	bad, _ := image(t, "io-bad.img")
	for path, v := range map[string]string{off: "off", bad: "sometimes"} {
		if err := unix.Setxattr(path, "user.xenblkd.direct-io", []byte(v), 0); err != nil {
			testenv.Skipf(t, "no user xattrs on %s: %v", path, err)
		}
	}
	// Direct I/O where this machine's file system allows it at 512-byte sectors.
	f, err := os.Open(plain)
	if err != nil {
		t.Fatal(err)
	}
	info, err := loop.InspectBacking(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	wantPlain := "buffered"
	if info.DirectIOAlign == 512 {
		wantPlain = "direct"
	}

	mustHotplug(t, d, "add", vbdSetup(t, 310, 51712, plain, "w"))
	mustHotplug(t, d, "add", vbdSetup(t, 311, 51712, off, "w"))
	t.Cleanup(func() {
		for _, dom := range []int{310, 311} {
			hotplug(t, d, "remove", bePath(dom, 51712))
		}
	})
	be := vbdSetup(t, 312, 51712, bad, "w")
	stderr, code := hotplug(t, d, "add", be)
	herr, _ := read(t, be+"/hotplug-error")
	if code == 0 || !strings.Contains(herr, `user.xenblkd.direct-io direct I/O setting "sometimes"`) || !strings.Contains(stderr, "sometimes") {
		t.Errorf("add with a bad attribute: exit %d, stderr %q, hotplug-error %q; want a refusal naming it", code, stderr, herr)
	}
	var st unix.Stat_t
	if err := unix.Stat(bad, &st); err != nil {
		t.Fatal(err)
	}
	if bs, err := loop.FindByBacking(loop.FileID{Dev: st.Dev, Ino: st.Ino}, nil); err != nil || len(bs) != 0 {
		t.Errorf("loop devices left on %s after the refusal: %v (%v)", bad, bs, err)
	}

	out, err := exec.Command(binary, "status", "--json", "--socket", d.socket).Output()
	if err != nil {
		t.Fatalf("status --json: %v", err)
	}
	var doc struct {
		Attachments []struct {
			Domid     int    `json:"domid"`
			IO        string `json:"io"`
			BlockSize int    `json:"block_size"`
		} `json:"attachments"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatal(err)
	}
	want := map[int]string{310: wantPlain, 311: "buffered"}
	for _, a := range doc.Attachments {
		if w, ok := want[a.Domid]; ok {
			if a.IO != w || a.BlockSize != 512 {
				t.Errorf("domain %d: io %q, block_size %d; want %q, 512", a.Domid, a.IO, a.BlockSize, w)
			}
			delete(want, a.Domid)
		}
	}
	if len(want) != 0 {
		t.Errorf("status lacks domains %v:\n%s", want, out)
	}
}
