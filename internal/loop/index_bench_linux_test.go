package loop_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/loop"
)

// Where BenchmarkSharingCheck puts its 1,000 bound and 1,000 unbound loop
// devices: indexes of its own, far above what a host uses, so that nothing
// else allocates them (LOOP_CTL_GET_FREE hands out the lowest unbound one).
const (
	benchBoundBase   = 60000
	benchUnboundBase = 61000
	benchOthers      = 1000
)

// BenchmarkSharingCheck is the add's sharing check (the devices bound to the
// file, the daemon's own left out) with 0, then 1,000 other loop devices
// bound on the host plus 1,000 unbound loop nodes: from the Index, and by the
// scan of every device (FindByBacking) for comparison. It prints
// medians and the 1,000/0 ratios; the index's must stay ≤ 1.1×. Heavy (2,000
// devices, each on its own sparse 1 MiB file, freed at the end): not part of
// `make test`; run with `make bench-sharing`.
func BenchmarkSharingCheck(b *testing.B) {
	requireRoot(b)
	ix := newIndex(b)
	dir := b.TempDir()
	newFile := func(name string) *os.File {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			b.Fatal(err)
		}
		if err := os.Truncate(path, 1<<20); err != nil {
			b.Fatal(err)
		}
		f, err := loop.OpenBacking(path, true)
		if err != nil {
			b.Fatal(err)
		}
		return f
	}
	// The disk being added: a fresh image, and one the daemon holds a
	// read-only device of (skipped, as the model does).
	fresh := newFile("fresh.img")
	freshID := backingID(b, fresh)
	fresh.Close()
	shared := newFile("shared.img")
	held, err := loop.Attach(shared, loop.Options{ReadOnly: true, Tag: testTag(b)})
	shared.Close()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { held.Close() })
	trust(b, ix, held)
	skip := func(p string) bool { return p == held.Path() }

	const indexRounds, scanRounds = 2000, 10
	type result struct{ fresh, shared, scan time.Duration }
	measure := func() result {
		// The lowest of 5 batch medians: the machine is shared, and a
		// sub-microsecond call is easily disturbed.
		timeIt := func(rounds int, fn func() ([]loop.Binding, error)) time.Duration {
			best := time.Duration(1<<63 - 1)
			for range 5 {
				d := make([]time.Duration, rounds)
				for i := range d {
					start := time.Now()
					found, err := fn()
					d[i] = time.Since(start)
					if err != nil || len(found) != 0 {
						b.Fatalf("sharing check: %v, %v; want no device", paths(found), err)
					}
				}
				best = min(best, median(d))
			}
			return best
		}
		return result{
			fresh:  timeIt(indexRounds, func() ([]loop.Binding, error) { return ix.FindByBacking(freshID, skip) }),
			shared: timeIt(indexRounds, func() ([]loop.Binding, error) { return ix.FindByBacking(held.Backing(), skip) }),
			scan:   timeIt(scanRounds, func() ([]loop.Binding, error) { return loop.FindByBacking(freshID, skip) }),
		}
	}
	nodes := func() int {
		entries, _ := filepath.Glob("/sys/block/loop*")
		return len(entries)
	}

	before, nodesBefore := measure(), nodes()
	start := time.Now()
	addOthers(b, newFile)
	setup := time.Since(start)
	ix.FindByBacking(freshID, skip) // apply the setup's events
	after, nodesAfter := measure(), nodes()
	if n := ix.Rescans(); n != 1 {
		b.Logf("note: %d full scans (the uevent socket overflowed during setup)", n)
	}

	ratio := func(a, b time.Duration) float64 { return float64(a) / float64(b) }
	b.ReportMetric(float64(before.fresh.Nanoseconds())/1e3, "index-0-µs")
	b.ReportMetric(float64(after.fresh.Nanoseconds())/1e3, "index-1000-µs")
	b.ReportMetric(ratio(after.fresh, before.fresh), "index-ratio")
	b.ReportMetric(ratio(after.scan, before.scan), "scan-ratio")
	b.Logf("setup: %d other bound + %d unbound loop devices in %v (loop nodes on the host: %d -> %d)",
		benchOthers, benchOthers, setup.Round(time.Millisecond), nodesBefore, nodesAfter)
	b.Logf("%-44s %12s %12s %8s", "sharing check (median)", "0 others", "1000+1000", "ratio")
	for _, row := range []struct {
		name          string
		before, after time.Duration
	}{
		{"index, image bound nowhere", before.fresh, after.fresh},
		{"index, image of a device the daemon holds", before.shared, after.shared},
		{"scan of every device (before the index)", before.scan, after.scan},
	} {
		b.Logf("%-44s %12v %12v %7.2fx", row.name, row.before, row.after, ratio(row.after, row.before))
	}
}

// addOthers binds benchOthers loop devices, each to its own sparse file, and
// adds benchOthers unbound loop nodes, at indexes of the benchmark's own; at
// cleanup it closes each bound device (AUTOCLEAR frees it) and removes every
// node it added, by index.
func addOthers(b *testing.B, newFile func(string) *os.File) {
	var added []int
	b.Cleanup(func() {
		start := time.Now()
		// LOOP_CTL_REMOVE waits for del_gendisk (tens of ms each): in parallel.
		var wg sync.WaitGroup
		work := make(chan int)
		for range 8 {
			wg.Go(func() {
				for index := range work {
					removeNode(b, index)
				}
			})
		}
		for _, index := range added {
			work <- index
		}
		close(work)
		wg.Wait()
		b.Logf("cleanup: %d loop devices removed in %v", len(added), time.Since(start).Round(time.Millisecond))
	})
	for i := range benchOthers {
		index := benchBoundBase + i
		if err := loop.AddNode(index); err != nil {
			b.Fatalf("add loop%d: %v", index, err)
		}
		added = append(added, index)
		f := newFile(fmt.Sprintf("other-%d.img", i))
		d, err := loop.AttachAt(index, f, loop.Options{ReadOnly: true, Tag: testTag(b)})
		f.Close()
		if err != nil {
			b.Fatalf("bind loop%d: %v", index, err)
		}
		b.Cleanup(func() { d.Close() }) // runs before the removal above
	}
	for i := range benchOthers {
		index := benchUnboundBase + i
		if err := loop.AddNode(index); err != nil {
			b.Fatalf("add loop%d: %v", index, err)
		}
		added = append(added, index)
	}
}

// removeNode removes a loop node the benchmark added, retrying while the
// device is still busy (the clear after its last close, an index reading it).
func removeNode(b *testing.B, index int) {
	for deadline := time.Now().Add(waitLimit); ; time.Sleep(time.Millisecond) {
		err := loop.RemoveNode(index)
		if err == nil || errors.Is(err, unix.ENODEV) {
			return
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			b.Errorf("remove loop%d: %v", index, err)
			return
		}
	}
}
