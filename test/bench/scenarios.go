package main

import (
	"fmt"
	"os"
	"os/exec"
	"sort"
	"sync"
	"time"
)

type sample []time.Duration

func (s sample) sorted() sample {
	c := append(sample(nil), s...)
	sort.Slice(c, func(i, j int) bool { return c[i] < c[j] })
	return c
}
func (s sample) median() time.Duration {
	if len(s) == 0 {
		return 0
	}
	c := s.sorted()
	if len(c)%2 == 1 {
		return c[len(c)/2]
	}
	return (c[len(c)/2-1] + c[len(c)/2]) / 2
}
func (s sample) min() time.Duration { return s.sorted()[0] }
func (s sample) max() time.Duration { return s.sorted()[len(s)-1] }

// row is one line of the table: one scenario, one operation, both peers.
type row struct {
	scenario, op string
	kind         string // "file" | "phy" for the scaling plot
	backends     int    // -1 unless a scaling row
	s            [nSlots]sample
}

// iterations per peer: the stock script takes ~85 ms per add (seconds at
// 1,000 backends), xenblkd a few ms.
type counts struct{ stock, xen int }

func (c config) n(full, quick counts) counts {
	if c.quick {
		return quick
	}
	return full
}

func scenarios(b *bench, r *report, peers []*peer) error {
	c := r.cfg
	stock := peers[0]
	fileImg := b.dir + "/disk.img"
	if err := sparseFile(fileImg, 1<<30); err != nil {
		return err
	}

	if c.onlyClust {
		return b.clusterCost(r)
	}
	// 0: the per-disk fast path beside the exec floor (fastpath.go), first,
	// while no other backends exist.
	if err := b.fastPath(r, peers, fileImg); err != nil {
		return err
	}
	if c.onlyProf {
		return b.profileOnly(r, peers)
	}
	// Cluster mode's lease beside no lease (cluster.go), also before other
	// backends exist.
	if err := b.clusterCost(r); err != nil {
		return err
	}
	// 1–3: file and phy, with 0/100/1,000 unrelated backends. Peer by peer,
	// each daemon started before the unrelated backends exist: a daemon
	// started with ~1,000 domains under backend/vbd fails its recovery
	// (XS_DIRECTORY of backend/vbd answers E2BIG past XenStore's 4,096-byte
	// payload), a limitation reported in the notes.
	type cell struct {
		nb   int
		kind string
	}
	var cells []cell
	for _, nb := range c.backends {
		for _, kind := range []string{"file", "phy"} {
			cells = append(cells, cell{nb, kind})
		}
	}
	adds, rms := make([]row, len(cells)), make([]row, len(cells))
	for i, cl := range cells {
		adds[i] = row{scenario: fmt.Sprintf("%s, %d other backends", cl.kind, cl.nb), op: "add", kind: cl.kind, backends: cl.nb}
		rms[i] = row{scenario: adds[i].scenario, op: "remove", backends: -1}
	}
	for _, p := range peers {
		if err := b.use(p); err != nil {
			return err
		}
		have := 0
		for i, cl := range cells {
			nb, kind := cl.nb, cl.kind
			if err := b.fakeBackends(have, nb); err != nil {
				return err
			}
			if nb > have && p.slot == slotPre {
				time.Sleep(time.Second) // pre-setup looks at each new backend (not ours): let it finish
			}
			have = max(have, nb)
			var n counts
			switch {
			case nb == 0:
				n = c.n(counts{25, 200}, counts{3, 20})
			case nb <= 100:
				n = c.n(counts{10, 200}, counts{2, 10})
			case kind == "phy": // stock: ~4.5 s per add at 1,000
				n = c.n(counts{4, 100}, counts{1, 10})
			default:
				n = c.n(counts{10, 100}, counts{2, 10})
			}
			params := fileImg
			if kind == "phy" {
				params = b.phyDev
			}
			cnt := n.stock
			if p != stock {
				cnt = n.xen
			}
			fmt.Printf("bench: %-17s %-28s x%d\n", p.name, adds[i].scenario, cnt)
			b.scenario = adds[i].scenario
			a, rm, err := b.addRemove(p, vbd{domid: 1, params: params, mode: "w"}, cnt, nb < 1000)
			if err != nil {
				return err
			}
			adds[i].s[p.slot], rms[i].s[p.slot] = a, rm
		}
		p.stop() // before the unrelated backends go: a pre-setup daemon would check each
		b.rmFakeBackends(have)
	}
	for i := range cells {
		r.rows = append(r.rows, adds[i], rms[i])
	}
	if err := b.loopScaling(r, peers); err != nil { // loops.go
		return err
	}

	// 4: K disks of one guest added at once, as libxl does.
	var imgs []string
	for k := range 16 {
		img := fmt.Sprintf("%s/conc%d.img", b.dir, k)
		if err := sparseFile(img, 1<<30); err != nil {
			return err
		}
		imgs = append(imgs, img)
	}
	for _, k := range []int{1, 4, 16} {
		n := c.n(counts{8, 50}, counts{2, 5})
		add := row{scenario: fmt.Sprintf("%d file disks at once (all done)", k), op: "add", backends: -1}
		rm := row{scenario: add.scenario, op: "remove", backends: -1}
		for _, p := range peers {
			cnt := n.stock
			if p != stock {
				cnt = n.xen
			}
			if err := b.use(p); err != nil {
				return err
			}
			fmt.Printf("bench: %-17s %-28s x%d\n", p.name, add.scenario, cnt)
			b.scenario = add.scenario
			adds, rms, err := b.concurrent(p, imgs[:k], cnt)
			if err != nil {
				return err
			}
			add.s[p.slot], rm.s[p.slot] = adds, rms
		}
		r.rows = append(r.rows, add, rm)
	}

	// 5: read-only attachments of one image across many domains.
	roImg := b.dir + "/ro.img"
	if err := sparseFile(roImg, 1<<30); err != nil {
		return err
	}
	for _, p := range peers {
		if err := b.use(p); err != nil {
			return err
		}
		doms := 200
		if c.quick {
			doms = 20
		}
		if p == stock {
			doms = 2 // 10 per domain; the stock script makes a loop device per attachment
			if c.quick {
				doms = 1
			}
		}
		fmt.Printf("bench: %-17s %d read-only attachments of one image\n", p.name, doms*10)
		b.scenario = "read-only attachments"
		ro, err := b.readOnly(p, roImg, doms, 10)
		if err != nil {
			return err
		}
		r.ro[p.slot] = ro
	}

	// Pre-setup: commit of libxl's transaction to the script's exit.
	if err := b.commitToExit(r, peers, fileImg); err != nil {
		return err
	}
	// The hotplug entry's own cost, and where an add's time goes.
	xen := peerInSlot(peers, slotXen)
	if err := b.entryCost(r, xen); err != nil {
		return err
	}
	return b.profile(r, peers)
}

// addRemove runs n iterations of: write nodes (untimed), time add, check
// physical-device, time remove, clean up. One untimed warm-up first.
func (b *bench) addRemove(p *peer, v vbd, n int, warmup bool) (adds, rms sample, err error) {
	if warmup {
		n++
	}
	for i := range n {
		// A fresh domain per iteration, as a new guest gets a new domid: a
		// backend path reused at once would race pre-setup's bookkeeping of
		// the previous one (see the report's notes).
		v.domid = 2000 + i
		var ta, tr time.Duration
		err := b.retry(p, v.xbPath(), func() (err error) {
			ta, tr, err = b.addRemoveOnce(p, v)
			return err
		})
		if err != nil {
			if b.ctx.Err() != nil {
				return nil, nil, err
			}
			continue // counted in the report as failures
		}
		if warmup && i == 0 {
			continue
		}
		adds, rms = append(adds, ta), append(rms, tr)
	}
	return adds, rms, nil
}

// retry runs one iteration again (up to 3 attempts) after a failure, and
// notes the failure in the report: a failed add is a result, not noise.
func (b *bench) retry(p *peer, what string, f func() error) error {
	var err error
	for attempt := 1; attempt <= 3; attempt++ {
		if err = b.ctx.Err(); err != nil {
			return err
		}
		if err = f(); err == nil {
			return nil
		}
		b.r.fail[p.name+"|"+b.scenario]++
		if b.r.fail[p.name+"|"+b.scenario] <= 2 { // the first ones in full, then only counted
			b.r.notef("%s, %s: iteration failed (attempt %d): %v", p.name, b.scenario, attempt, err)
		}
	}
	return err
}

func (b *bench) addRemoveOnce(p *peer, v vbd) (ta, tr time.Duration, err error) {
	defer b.rmDomain(v.domid)
	if p.name == "stock" {
		defer b.settleStock()
	}
	if err := b.setup(v, p); err != nil {
		return 0, 0, err
	}
	ta, err = p.run("add", v.xbPath())
	if err == nil {
		err = b.checkAdded(v)
	}
	if err != nil {
		p.run("remove", v.xbPath())
		b.cleanup(v)
		return 0, 0, err
	}
	tr, err = p.run("remove", v.xbPath())
	if cerr := b.cleanup(v); err == nil {
		err = cerr
	}
	return ta, tr, err
}

// runAll starts op for every vbd at the same instant and returns the time
// until the last one exited.
func runAll(p *peer, op string, vs []vbd) (time.Duration, error) {
	var wg sync.WaitGroup
	errs := make([]error, len(vs))
	start := make(chan struct{})
	for i, v := range vs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			_, errs[i] = p.run(op, v.xbPath())
		}()
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	d := time.Since(t0)
	for _, err := range errs {
		if err != nil {
			return d, err
		}
	}
	return d, nil
}

func (b *bench) concurrent(p *peer, imgs []string, n int) (adds, rms sample, err error) {
	var vs []vbd
	for k, img := range imgs {
		vs = append(vs, vbd{domid: 1, index: k, params: img, mode: "w"})
	}
	for i := range n + 1 { // +1 warm-up
		for k := range vs {
			vs[k].domid = 2500 + i // a fresh domain per iteration (see addRemove)
		}
		var ta, tr time.Duration
		err := b.retry(p, fmt.Sprintf("%d disks at once", len(vs)), func() (err error) {
			ta, tr, err = b.concurrentOnce(p, vs)
			return err
		})
		if err != nil {
			if b.ctx.Err() != nil {
				return nil, nil, err
			}
			continue // counted in the report as failures
		}
		if i > 0 {
			adds, rms = append(adds, ta), append(rms, tr)
		}
	}
	return adds, rms, nil
}

func (b *bench) concurrentOnce(p *peer, vs []vbd) (ta, tr time.Duration, err error) {
	defer b.rmDomain(vs[0].domid)
	if p.name == "stock" {
		defer b.settleStock()
	}
	for _, v := range vs {
		if err := b.setup(v, p); err != nil {
			return 0, 0, err
		}
	}
	ta, err = runAll(p, "add", vs)
	for _, v := range vs {
		if err == nil {
			err = b.checkAdded(v)
		}
	}
	if err == nil {
		tr, err = runAll(p, "remove", vs)
	} else {
		runAll(p, "remove", vs)
	}
	for _, v := range vs {
		b.cleanup(v)
	}
	return ta, tr, err
}

// roResult: scenario 5.
type roResult struct {
	attachments, domains int
	add, rm              sample
	physDevs             int // distinct physical-device values
	loops                int // loop devices backed by the image (sysfs)
	rssKiB               int // daemon VmRSS with all attached (-1: n/a)
}

func (b *bench) readOnly(p *peer, img string, domains, perDomain int) (ro roResult, err error) {
	ro.domains, ro.rssKiB = domains, -1
	var vs []vbd
	for d := range domains {
		for i := range perDomain {
			vs = append(vs, vbd{domid: 1000 + d, index: i, params: img, mode: "r"})
		}
	}
	defer func() {
		for _, v := range vs {
			b.cleanup(v)
		}
		if p.name == "stock" {
			b.settleStock()
		}
		for d := range domains {
			b.rmDomain(1000 + d)
		}
	}()
	phys := map[string]bool{}
	for _, v := range vs {
		if err := b.ctx.Err(); err != nil {
			return ro, err
		}
		if err := b.setup(v, p); err != nil {
			return ro, err
		}
		var t time.Duration
		err := b.retry(p, v.xbPath(), func() (err error) {
			if t, err = p.run("add", v.xbPath()); err != nil {
				p.run("remove", v.xbPath())
				b.cleanup(v)
				b.setup(v, p)
			}
			return err
		})
		if err != nil {
			return ro, err
		}
		pd, err := b.xs.Read(b.ctx, v.be()+"/physical-device")
		if err != nil || pd == "" {
			return ro, fmt.Errorf("%s: no physical-device after add (%v)", v.be(), err)
		}
		phys[pd] = true
		ro.add = append(ro.add, t)
		ro.attachments++
	}
	ro.physDevs = len(phys)
	ro.loops = len(loopsBackedBy(img))
	ro.rssKiB = p.rssKiB()
	for _, v := range vs {
		t, err := p.run("remove", v.xbPath())
		if err != nil {
			return ro, err
		}
		ro.rm = append(ro.rm, t)
	}
	return ro, nil
}

// entryRow: exec-to-exit of one command, for context.
type entryRow struct {
	what string
	s    sample
	cpu  sample // user+sys CPU of the process (rusage)
	err  string
}

func (b *bench) entryCost(r *report, xen *peer) error {
	n := 200
	if r.cfg.quick {
		n = 30
	}
	timeIt := func(what string, argv []string, env []string) {
		er := entryRow{what: what}
		for i := range n + 1 {
			cmd := &exec.Cmd{Path: argv[0], Args: argv, Env: env}
			t0 := time.Now()
			out, err := cmd.CombinedOutput()
			d := time.Since(t0)
			if err != nil && what != "xenblkd --help" {
				er.err = fmt.Sprintf("%v: %.200s", err, out)
				break
			}
			if i > 0 {
				er.s = append(er.s, d)
				er.cpu = append(er.cpu, cmd.ProcessState.UserTime()+cmd.ProcessState.SystemTime())
			}
		}
		r.entry = append(r.entry, er)
	}
	timeIt("/bin/true", []string{"/bin/true"}, nil)
	if floor, err := b.floorProgram(); err != nil {
		r.notef("exec floor: %v", err)
	} else {
		timeIt(execFloor, []string{floor}, nil)
	}

	// An empty static Go program (CGO_ENABLED=0, as bin/xenblkd is built).
	src := b.dir + "/empty/main.go"
	os.MkdirAll(b.dir+"/empty", 0o755)
	os.WriteFile(src, []byte("package main\n\nfunc main() {}\n"), 0o644)
	os.WriteFile(b.dir+"/empty/go.mod", []byte("module empty\n\ngo 1.26\n"), 0o644)
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", b.dir+"/empty/empty", ".")
	build.Dir = b.dir + "/empty"
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		r.notef("empty Go program: build failed: %v %s", err, out)
	} else {
		timeIt("empty Go program (static)", []string{b.dir + "/empty/empty"}, nil)
	}
	if xen == nil {
		return nil
	}
	timeIt("xenblkd version", []string{xen.bin, "version"}, nil)

	// add against a daemon that answers {"ok":true} at once: the entry's own
	// cost (env, one connect, one request, one reply, exit).
	sock, stop, err := fakeDaemon(b.dir + "/fake-api.sock")
	if err != nil {
		r.notef("fake daemon: %v", err)
		return nil
	}
	defer stop()
	env := []string{basePath, "script=" + xen.script, "XENBUS_TYPE=vbd", "XENBUS_PATH=backend/vbd/1/51712",
		"XENBUS_BASE_PATH=backend", "XENBLKD_SOCKET=" + sock, "XENSTORED_PATH=" + b.dir + "/no-xenstored"}
	timeIt(entryAdd, []string{xen.script, "add"}, env)
	timeIt(goEntryAdd, []string{xen.bin, "add"}, env)
	return nil
}

func (b *bench) profileOnly(r *report, peers []*peer) error {
	for k := range 16 {
		if err := sparseFile(fmt.Sprintf("%s/conc%d.img", b.dir, k), 1<<30); err != nil {
			return err
		}
	}
	xen := peerInSlot(peers, slotXen)
	if err := b.entryCost(r, xen); err != nil {
		return err
	}
	return b.profile(r, peers)
}
