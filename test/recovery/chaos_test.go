package recovery_test

import (
	"flag"
	"fmt"
	"math/rand"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var (
	chaosOps     = flag.Int("chaos.ops", 500, "random add/remove operations per chaos run")
	chaosDomains = flag.Int("chaos.domains", 20, "domains the operations are spread over")
	chaosSeed    = flag.Int64("chaos.seed", 0, "random seed (0: time)")
)

// TestChaos is the fault-injection run: a storm of random adds and removes
// over many domains (4 workers, each owning its domains) while another
// goroutine SIGKILLs the daemon at random moments, with the fd store (systemd
// sandbox) and without (plain subprocess, restarted by hand). Afterwards it
// prints and checks: 0 tagged loop devices without a user, 0 wrong devices,
// every completed add still attached; then removes everything: 0 left.
//
// The blkback stand-in holds every device once its add completed without the
// fd store, and only every other one with it (the store alone keeps the rest).
func TestChaos(t *testing.T) {
	t.Run("without-fdstore", func(t *testing.T) {
		storm(t, startProc(t), privateDir(t, "xb-chaos-img-"), true)
	})
	t.Run("with-fdstore", func(t *testing.T) {
		dir := privateDir(t, "xb-chaos-img-")
		os.Chmod(dir, 0o755)
		phy := chaosPhy(t, dir) // before the sandbox: its /dev is fixed at boot
		u := startUnit(t, dir)
		storm(t, u, dir, false, phy...)
	})
}

func chaosPhy(t *testing.T, dir string) []string {
	return []string{losetup(t, makeImage(t, dir, "phy0.img")), losetup(t, makeImage(t, dir, "phy1.img"))}
}

type stormStats struct {
	adds, addsFailed, removes, kills, lost atomic.Int64
}

func storm(t *testing.T, d daemonCtl, dir string, holdAll bool, phy ...string) {
	if phy == nil {
		phy = chaosPhy(t, dir)
	}
	seed := *chaosSeed
	if seed == 0 {
		seed = time.Now().UnixNano()
	}
	t.Logf("seed %d (rerun with -chaos.seed %d)", seed, seed)
	shared := []string{makeImage(t, dir, "ro0.img"), makeImage(t, dir, "ro1.img"), makeImage(t, dir, "ro2.img")}
	const workers = 4
	domains := max(*chaosDomains, workers)

	var st stormStats
	var tr trail
	var wantMu sync.Mutex
	want := map[key]*attached{} // completed adds not removed since
	t.Cleanup(func() {
		wantMu.Lock()
		defer wantMu.Unlock()
		for _, a := range want {
			a.release()
		}
	})

	done := make(chan struct{})
	killerDone := make(chan struct{})
	go func() { // the killer
		defer close(killerDone)
		r := rand.New(rand.NewSource(seed + 1))
		for {
			select {
			case <-done:
				return
			case <-time.After(time.Duration(20+r.Intn(180)) * time.Millisecond):
			}
			d.Kill9(t)
			st.kills.Add(1)
		}
	}()

	var wg sync.WaitGroup
	var opsLeft atomic.Int64
	opsLeft.Store(int64(*chaosOps))
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed + int64(10+w)))
			var slots []key
			for dom := w; dom < domains; dom += workers {
				for dev := 0; dev < 4; dev++ {
					slots = append(slots, key{domid: 100 + dom, devid: 51712 + dev})
				}
			}
			mine := map[key]*attached{}
			n := 0
			for opsLeft.Add(-1) >= 0 && !t.Failed() {
				k := slots[r.Intn(len(slots))]
				if a := mine[k]; a != nil {
					tr.note(k, "remove")
					removeUntilDone(t, d, k)
					a.release() // blkback lets go (after the remove: it is the last user here)
					rmBackend(k)
					delete(mine, k)
					wantMu.Lock()
					delete(want, k)
					wantMu.Unlock()
					st.removes.Add(1)
					continue
				}
				n++
				var params, mode string
				switch r.Intn(4) {
				case 0, 1:
					params, mode = makeImage(t, dir, fmt.Sprintf("w%d-%d.img", w, n)), "w"
				case 2:
					params, mode = shared[r.Intn(len(shared))], "r"
				case 3:
					params, mode = phy[r.Intn(len(phy))], "r"
				}
				setupBackend(t, k, params, mode, "/etc/xen/scripts/xenblkd")
				st.adds.Add(1)
				tr.note(k, "add "+params+" "+mode)
				if out, code := hotplug(t, d, "add", k); code != 0 {
					tr.note(k, fmt.Sprintf("add failed (%d): %s", code, strings.TrimSpace(out)))
					// As libxl: a failed add is followed by remove.
					st.addsFailed.Add(1)
					removeUntilDone(t, d, k)
					rmBackend(k)
					continue
				}
				a, err := readAttached(t, k)
				if err == nil && (holdAll || r.Intn(2) == 0) {
					err = hold(t, &a)
				}
				tr.note(k, fmt.Sprintf("add done: %x diskseq %d held %v, err %v", a.rdev, a.diskseq, a.vm >= 0, err))
				if err != nil {
					// The daemon was killed after it answered and before the
					// stand-in opened the device: without the fd store the
					// device is gone (the window the store closes).
					st.lost.Add(1)
					t.Logf("completed add lost before blkback opened it: %s: %v", k.be(), err)
					removeUntilDone(t, d, k)
					rmBackend(k)
					continue
				}
				mine[k] = &a
				wantMu.Lock()
				want[k] = &a
				wantMu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(done)
	<-killerDone
	if t.Failed() {
		return
	}

	// A last crash, so the final state is a recovered one.
	d.Kill9(t)
	st.kills.Add(1)
	wantMu.Lock()
	c, why := settle(t, d, want)
	wantMu.Unlock()
	mism, recoveries := recoverySums(d.Log())
	report := fmt.Sprintf("%s: %d ops over %d domains, seed %d: %d adds (%d failed, as while the daemon was down), %d removes, %d SIGKILLs, %d recoveries (%d backends reported mismatched); "+
		"completed adds lost before blkback opened them: %d; %s",
		t.Name(), *chaosOps, domains, seed, st.adds.Load(), st.addsFailed.Load(), st.removes.Load(), st.kills.Load(),
		recoveries, mism, st.lost.Load(), c)
	t.Log(report)
	fmt.Fprintln(os.Stderr, "CHAOS", report)
	if c.Completed > 0 && c.Tagged == 0 {
		t.Errorf("%d completed adds but no device of this run found (the sysfs match of ourBindings is broken?): %s", c.Completed, c)
	}
	if !c.ok() {
		t.Errorf("invariants violated: %s\n%s", c, strings.Join(why, "\n"))
		for _, w := range why {
			if m := backendRE.FindStringSubmatch(w); m != nil {
				domid, _ := strconv.Atoi(m[1])
				devid, _ := strconv.Atoi(m[2])
				t.Logf("%s, what the test did:\n%s\nand the daemon's log of it:\n%s", m[0], tr.of(key{domid, devid}), linesAbout(d.Log(), domid, devid))
			}
		}
	}
	if !holdAll && st.lost.Load() != 0 {
		t.Errorf("%d completed adds lost with the fd store: it must keep every device", st.lost.Load())
	}

	wantMu.Lock()
	defer wantMu.Unlock()
	for k, a := range want {
		removeUntilDone(t, d, k)
		a.release()
		rmBackend(k)
	}
	want = map[key]*attached{}
	waitNoneTagged(t)
	fmt.Fprintf(os.Stderr, "CHAOS %s: after removing everything: %d tagged loop devices left\n", t.Name(), tagged(t))
}

// trail is what the storm did to each backend, for the report of a
// violated invariant.
type trail struct {
	mu   sync.Mutex
	byBE map[key][]string
}

func (tr *trail) note(k key, what string) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if tr.byBE == nil {
		tr.byBE = map[key][]string{}
	}
	tr.byBE[k] = append(tr.byBE[k], time.Now().UTC().Format("15:04:05.000 ")+what)
}

func (tr *trail) of(k key) string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return "\t" + strings.Join(tr.byBE[k], "\n\t")
}

var backendRE = regexp.MustCompile(`backend/vbd/(\d+)/(\d+)`)

// linesAbout returns the daemon log's lines about backend domid/devid.
func linesAbout(log string, domid, devid int) string {
	var out []string
	ids := fmt.Sprintf("domid=%d devid=%d ", domid, devid)
	path := fmt.Sprintf("backend/vbd/%d/%d", domid, devid)
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, ids) || strings.Contains(l, path) || strings.Contains(l, "recovery done") || strings.Contains(l, "serving") {
			out = append(out, "\t"+l)
		}
	}
	return strings.Join(out, "\n")
}

var summaryRE = regexp.MustCompile(`msg="recovery done".* mismatched=(\d+)`)

// recoverySums sums "mismatched" over the daemon's recovery summaries.
func recoverySums(log string) (mismatched, recoveries int) {
	for _, m := range summaryRE.FindAllStringSubmatch(log, -1) {
		n, _ := strconv.Atoi(m[1])
		mismatched += n
		recoveries++
	}
	return mismatched, recoveries
}
