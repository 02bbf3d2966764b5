package main_test

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"xenblkd/internal/loop"
)

// TestReAddWhileReleasedDeviceHeld: xl reboot, or a guest destroyed and
// another started on its image. The remove releases the daemon's loop
// device, but someone else still holds it open for a moment (here the test,
// standing in for udev's blkid probe), so it stays bound (AUTOCLEAR waits
// for the last close). The add of the same file waits for it to be freed
// instead of refusing it as a foreign device, up to 2 s; past that it says
// what holds it. The probe lets go once the daemon logs that the add waits,
// so that the wait, not the speed of the add, is what the test sees.
func TestReAddWhileReleasedDeviceHeld(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	tests := []struct {
		name        string
		letGoAtWait bool   // the probe closes the device once the add waits for it; false: only after the add has failed
		wantErr     string // "" for success
	}{
		{"probe closes while the add waits", true, ""},
		{"probe holds it past the bound", false, "which xenblkd released "},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img, sig := image(t, fmt.Sprintf("readd%d.img", i))
			be := vbdSetup(t, 330+10*i, 51712, img, "w")
			mustHotplug(t, d, "add", be)
			vm, rdev := standIn(t, be, sig, true)
			seq := diskseqOf(t, be)
			dev, _ := read(t, be+"/physical-device-path")
			probe, err := os.Open(dev) // as udev's blkid after a writer closes the device
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { probe.Close() })
			vm.Close()
			mustHotplug(t, d, "remove", be)
			if !bound(rdev, seq) {
				t.Fatalf("%s freed while the probe holds it", dev)
			}

			start := time.Now()
			be2 := vbdSetup(t, 331+10*i, 51712, img, "w") // pre-setup starts the add here
			t.Cleanup(func() { hotplug(t, d, "remove", be2) })
			if tt.letGoAtWait {
				go func() {
					if d.logged("waiting for the loop device xenblkd released to be freed") {
						probe.Close()
					}
				}()
			}
			if tt.wantErr == "" {
				mustHotplug(t, d, "add", be2)
				t.Logf("re-add took %v (the probe held %s until the add waited)", time.Since(start), dev)
				standIn(t, be2, sig, true)
				if !d.logged("the loop device xenblkd released is freed") {
					t.Errorf("the daemon did not log its wait:\n%s", d.logText())
				}
				mustHotplug(t, d, "remove", be2)
				return
			}
			stderr, code := hotplug(t, d, "add", be2)
			t.Logf("refusal took %v: %s", time.Since(start), strings.TrimSpace(stderr))
			herr, _ := read(t, be2+"/hotplug-error")
			for _, want := range []string{tt.wantErr, dev + fmt.Sprintf(" (diskseq %d)", seq), "fuser -v " + dev, "mode w! to override"} {
				if code == 0 || !strings.Contains(stderr, want) || !strings.Contains(herr, want) {
					t.Errorf("add: exit %d, stderr %q, hotplug-error %q; want a refusal containing %q", code, stderr, herr, want)
				}
			}
			if _, ok := read(t, be2+"/physical-device"); ok {
				t.Error("physical-device written for a refused add")
			}
			probe.Close()
			if bound(rdev, seq) {
				t.Fatalf("%s still bound after the probe closed it", dev)
			}
			be3 := vbdSetup(t, 332+10*i, 51712, img, "w")
			mustHotplug(t, d, "add", be3)
			mustHotplug(t, d, "remove", be3)
		})
	}
}

// TestOurTagNotReleasedRefused: a device carrying the daemon's tag that it
// never made (another xenblkd with the same --tag) is someone else's: the
// add is refused at once, not waited for.
func TestOurTagNotReleasedRefused(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	img, _ := image(t, "sametag.img")
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	other, err := loop.Attach(f, loop.Options{Tag: tag}) // AUTOCLEAR: freed by Close
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	be := vbdSetup(t, 350, 51712, img, "w")
	refused(t, d, be, fmt.Sprintf("loop device %s (tag %q, xenblkd's, but not held by this daemon", other.Path(), tag))
	if strings.Contains(d.logText(), "released is freed") {
		t.Errorf("the daemon waited for a device it never released:\n%s", d.logText())
	}
}
