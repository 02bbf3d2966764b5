package loop_test

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"xenblkd/internal/loop"
)

// BenchmarkAttachVsLosetup measures b.N attach+close cycles of this package
// (OpenBacking, Attach, Close: the daemon's whole hot path), then b.N
// `losetup -f --show` + `losetup -d` cycles on the same file, and reports
// both medians and their ratio. Run with `make bench-loop`.
//
// Two phases, not alternating cycles: an exec in between (even /bin/true)
// roughly doubles the next attach's time on a 2-vCPU machine (measured
// 127 µs vs 255-326 µs), which would measure the exec, not the attach.
func BenchmarkAttachVsLosetup(b *testing.B) {
	requireRoot(b)
	path := sparseFile(b, 64<<20)
	tag := testTag(b)
	var attaches, ours, theirs []time.Duration

	for range b.N {
		start := time.Now()
		backing, err := loop.OpenBacking(path, false)
		if err != nil {
			b.Fatal(err)
		}
		d, err := loop.Attach(backing, loop.Options{Tag: tag})
		backing.Close()
		if err != nil {
			b.Fatal(err)
		}
		attaches = append(attaches, time.Since(start))
		if err := d.Close(); err != nil {
			b.Fatal(err)
		}
		ours = append(ours, time.Since(start))
	}

	for range b.N {
		start := time.Now()
		out, err := exec.Command("losetup", "-f", "--show", path).Output()
		if err != nil {
			b.Fatalf("losetup -f --show: %v", err)
		}
		dev := strings.TrimSpace(string(out))
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			b.Fatalf("losetup -d %s: %v: %s", dev, err, out)
		}
		theirs = append(theirs, time.Since(start))
	}

	attach, cycle, losetup := median(attaches), median(ours), median(theirs)
	b.ReportMetric(float64(attach.Nanoseconds())/1e3, "attach-p50-µs")
	b.ReportMetric(float64(cycle.Nanoseconds())/1e3, "cycle-p50-µs")
	b.ReportMetric(float64(losetup.Nanoseconds())/1e3, "losetup-p50-µs")
	b.ReportMetric(float64(losetup)/float64(cycle), "speedup-x")
	if b.N == 1 {
		return // the framework's warm-up run: nothing to report
	}
	b.Logf("%d cycles: attach median %v, attach+close median %v, losetup -f/-d median %v: %.1fx faster",
		len(ours), attach, cycle, losetup, float64(losetup)/float64(cycle))
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkFindByBackingHeld measures the sharing scan with 50 devices of
// ours bound: FindByBacking without skip inspects each; with skip, told they
// are held, opens none of them.
func BenchmarkFindByBackingHeld(b *testing.B) {
	requireRoot(b)
	path := sparseFile(b, 1<<20)
	other := sparseFile(b, 1<<20)
	held := map[string]bool{}
	for range 50 {
		held[attach(b, other, loop.Options{ReadOnly: true}).Path()] = true
	}
	id := attach(b, path, loop.Options{}).Backing()
	b.Run("all", func(b *testing.B) {
		for range b.N {
			if _, err := loop.FindByBacking(id, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("skip-held", func(b *testing.B) {
		for range b.N {
			if _, err := loop.FindByBacking(id, func(p string) bool { return held[p] }); err != nil {
				b.Fatal(err)
			}
		}
	})
}
