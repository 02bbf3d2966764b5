package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"xenblkd/test/libxl"
	"xenblkd/test/looptest"
)

// vbd is one disk of one guest, as libxl (4.17 to 4.20) describes it in XenStore.
type vbd struct {
	domid, index int // index: xvda=0, xvdb=1, ...
	params, mode string
}

func (v vbd) devid() int     { return 51712 + 16*v.index } // xvda = 202:0
func (v vbd) be() string     { return fmt.Sprintf("/local/domain/0/backend/vbd/%d/%d", v.domid, v.devid()) }
func (v vbd) fe() string     { return fmt.Sprintf("/local/domain/%d/device/vbd/%d", v.domid, v.devid()) }
func (v vbd) xbPath() string { return fmt.Sprintf("backend/vbd/%d/%d", v.domid, v.devid()) }

// nodes are the ones libxl's device_disk_add writes in one transaction
// (test/libxl), with state=2 that blkback would write (InitWait, which libxl
// waits for before exec'ing the script).
func (v vbd) nodes(script string) [][2]string {
	return libxl.Disk{Domid: v.domid, Devid: v.devid(), Params: v.params, Mode: v.mode, Script: script,
		Vdev: "xvd" + string(rune('a'+v.index)), State: 2}.Nodes()
}

// bench holds what every scenario shares.
type bench struct {
	ctx      context.Context
	xs       store
	dir      string // private work dir: every image and loop backing file is in it
	phyDev   string // the loop device the bench made for phy:
	phy      *looptest.Device
	phyFile  string
	r        *report
	scenario string // for failure counts
	peers    []*peer
	xsSocket string // the XenStore socket the daemons are started against
}

// use makes p's daemon the only xenblkd daemon running (none for stock): a
// pre-setup daemon watches the whole backend tree and must not react to (or
// take CPU from) another peer's disks.
func (b *bench) use(p *peer) error {
	for _, o := range b.peers {
		if o != p {
			o.stop()
		}
	}
	if p.bin == "" {
		return nil
	}
	return p.start(b.xsSocket)
}

func (b *bench) setup(v vbd, p *peer) error { return b.xs.WriteTx(b.ctx, v.nodes(p.script)) }

// checkAdded: add must have written physical-device.
func (b *bench) checkAdded(v vbd) error {
	pd, err := b.xs.Read(b.ctx, v.be()+"/physical-device")
	if err != nil || pd == "" {
		return fmt.Errorf("%s: physical-device not written after add (%v)", v.be(), err)
	}
	return nil
}

// cleanup is Appendix B's vbd-clean.sh: detach the loop device the stock
// script recorded in `node` (only if it is still backed by one of our files:
// its own remove normally detached it already and the number may have been
// reused by someone else since), then remove the nodes.
func (b *bench) cleanup(v vbd) error {
	if node, err := b.xs.Read(b.ctx, v.be()+"/node"); err == nil && node != "" {
		b.detachIfOurs(node)
	}
	if err := b.xs.Rm(b.ctx, v.be()); err != nil {
		return err
	}
	return b.xs.Rm(b.ctx, v.fe())
}

func (b *bench) rmDomain(domid int) {
	b.xs.Rm(b.ctx, fmt.Sprintf("/local/domain/0/backend/vbd/%d", domid))
	b.xs.Rm(b.ctx, fmt.Sprintf("/local/domain/%d", domid))
}

// backingFile of /dev/loopN, "" if none.
func backingFile(dev string) string {
	s, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), "loop/backing_file"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(s))
}

func (b *bench) ours(file string) bool { return strings.HasPrefix(file, b.dir+"/") }

func (b *bench) detachIfOurs(dev string) {
	if dev == b.phyDev {
		return
	}
	if bf := backingFile(dev); bf != "" && b.ours(bf) {
		exec.Command("losetup", "-d", dev).Run()
	}
}

// loopsBackedBy lists loop devices whose backing file is file.
func loopsBackedBy(file string) []string {
	var devs []string
	m, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range m {
		s, err := os.ReadFile(f)
		if err == nil && strings.TrimSpace(string(s)) == file {
			devs = append(devs, "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(f))))
		}
	}
	return devs
}

// leftoverLoops: loop devices backed by files in our private dir, except the
// phy device the bench made itself.
func (b *bench) leftoverLoops() []string {
	var devs []string
	m, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range m {
		s, err := os.ReadFile(f)
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(f)))
		if err == nil && b.ours(strings.TrimSpace(string(s))) && dev != b.phyDev {
			devs = append(devs, dev)
		}
	}
	return devs
}

// settleStock waits (untimed) until no loop device is backed by our files
// any more, after a stock iteration: `losetup -d` of a device that someone
// still has open only sets autoclear, and the next `losetup -f` + attach then
// races with the pending release (EBUSY). Devices still bound after 3 s are
// detached by path and noted (they were made by the stock script from our
// own files, and only the stock peer runs at this point).
func (b *bench) settleStock() {
	for range 300 {
		if len(b.leftoverLoops()) == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, dev := range b.leftoverLoops() {
		b.r.notef("stock: %s still bound to %s 3 s after remove: detached it", dev, backingFile(dev))
		exec.Command("losetup", "-d", dev).Run()
	}
}

func sparseFile(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Truncate(size)
}

// fakeBackends makes backends n0..n-1 of other domains (domid 100+i): vbds
// with a physical-device that matches nothing, as the baseline doc's scaling
// run does.
func (b *bench) fakeBackends(from, to int) error {
	for i := from; i < to; {
		var kv [][2]string
		for ; i < to && len(kv) < 200; i++ {
			be := fmt.Sprintf("/local/domain/0/backend/vbd/%d/51712", 100+i)
			kv = append(kv, [2]string{be + "/physical-device", fmt.Sprintf("fe:%x", i)},
				[2]string{be + "/params", fmt.Sprintf("/dev/mapper/vg-guest%d", 100+i)},
				[2]string{be + "/mode", "w"}, [2]string{be + "/type", "phy"},
				[2]string{be + "/script", "/etc/xen/scripts/block"},
				[2]string{be + "/frontend-id", fmt.Sprint(100 + i)}, [2]string{be + "/state", "4"})
		}
		if err := b.xs.WriteTx(b.ctx, kv); err != nil {
			return fmt.Errorf("fake backends: %w", err)
		}
	}
	return nil
}

func (b *bench) rmFakeBackends(n int) {
	for i := range n {
		b.xs.Rm(b.ctx, fmt.Sprintf("/local/domain/0/backend/vbd/%d", 100+i))
	}
}
