package main_test

import (
	"strings"
	"testing"

	"xenblkd/test/looptest"
)

// TestForeignLoopDeviceIndexed: once the daemon's loop index is in use (it
// saw the uevent of its own first bind), a device losetup binds afterwards
// is found by the sharing check at once, and its detach is seen too.
func TestForeignLoopDeviceIndexed(t *testing.T) {
	d := startDaemon(t, xsd.Socket)
	first, _ := image(t, "indexed-first.img")
	be := vbdSetup(t, 320, 51712, first, "w")
	mustHotplug(t, d, "add", be)
	t.Cleanup(func() { hotplug(t, d, "remove", be) })
	if !d.logged("loop devices indexed by backing file") {
		t.Fatalf("the daemon did not start answering from its loop index:\n%s", d.logText())
	}

	img, _ := image(t, "indexed-foreign.img")
	foreign := looptest.Losetup(t, img)
	be2 := vbdSetup(t, 321, 51712, img, "w")
	stderr, code := hotplug(t, d, "add", be2)
	if herr, _ := read(t, be2+"/hotplug-error"); code == 0 || !strings.Contains(herr, foreign.Path) || !strings.Contains(stderr, foreign.Path) {
		t.Fatalf("rw add with foreign %s bound after the index started: exit %d, stderr %q, hotplug-error %q; want a refusal naming it", foreign.Path, code, stderr, herr)
	}
	if err := foreign.Detach(); err != nil {
		t.Fatal(err)
	}
	be3 := vbdSetup(t, 322, 51712, img, "w")
	mustHotplug(t, d, "add", be3)
	mustHotplug(t, d, "remove", be3)
}
