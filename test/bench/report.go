package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"
)

type report struct {
	cfg                config
	start, end         time.Time
	xenstored, client  string
	stockVersion       string
	rows               []row
	roStock, roXen     roResult
	entry              []entryRow
	notes              []string
	loadStart, loadEnd string
	fail               map[string]int // "peer|scenario" → failed attempts
}

func (r *report) notef(format string, a ...any) {
	s := fmt.Sprintf(format, a...)
	r.notes = append(r.notes, s)
	fmt.Fprintln(os.Stderr, "bench:", s)
}

func ms(d time.Duration) string  { return fmt.Sprintf("%.1f", float64(d)/1e6) }
func ms2(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d)/1e6) }

func cell(s sample) string {
	if len(s) == 0 {
		return "—"
	}
	return fmt.Sprintf("**%s** (%s–%s) n=%d", ms2(s.median()), ms2(s.min()), ms2(s.max()), len(s))
}

func ratio(a, b sample) string {
	if len(a) == 0 || len(b) == 0 || b.median() == 0 {
		return "—"
	}
	return fmt.Sprintf("%.1f×", float64(a.median())/float64(b.median()))
}

// machine describes where the run happened.
func machine() []string {
	model, mem := "?", "?"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "MemTotal:" {
				var kb int
				fmt.Sscan(f[1], &kb)
				mem = fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	rev, _ := exec.Command("git", "describe", "--always", "--dirty").Output()
	return []string{
		fmt.Sprintf("CPU: %d × %s (nproc %d); memory %s", runtime.NumCPU(), model, runtime.NumCPU(), mem),
		"kernel " + strings.TrimSpace(string(kernel)),
		"xenblkd tree " + strings.TrimSpace(string(rev)) + ", " + runtime.Version(),
	}
}

type target struct {
	name, verdict, evidence string
}

func (r *report) find(scenario, op string) *row {
	for i := range r.rows {
		if r.rows[i].scenario == scenario && r.rows[i].op == op {
			return &r.rows[i]
		}
	}
	return nil
}

// targets from issue 6, checked against this run's numbers.
func (r *report) targets() []target {
	var ts []target
	na := func(name string) { ts = append(ts, target{name, "N/A", "xenblkd not measured in this run"}) }
	verdict := func(ok bool) string {
		if ok {
			return "PASS"
		}
		return "MISS"
	}
	for _, kind := range []string{"file", "phy"} {
		row := r.find(kind+", 0 other backends", "add")
		name := fmt.Sprintf("%s add at 0 backends ≥ 40× faster than stock and ≤ 2.1 ms", kind)
		if row == nil || len(row.xen) == 0 {
			na(name)
		} else {
			x, s := row.xen.median(), row.stock.median()
			ts = append(ts, target{name, verdict(float64(s)/float64(x) >= 40 && x <= 2100*time.Microsecond),
				fmt.Sprintf("stock %s ms / xenblkd %s ms = %s", ms2(s), ms2(x), ratio(row.stock, row.xen))})
		}
		name = fmt.Sprintf("%s add faster than qubes-block (~3.5 ms)", kind)
		if row == nil || len(row.xen) == 0 {
			na(name)
		} else {
			ts = append(ts, target{name, verdict(row.xen.median() < 3500*time.Microsecond), "xenblkd " + ms2(row.xen.median()) + " ms"})
		}
		hi := r.cfg.backends[len(r.cfg.backends)-1]
		name = fmt.Sprintf("%s add flat (≤ 1.2×) from 0 to %d backends", kind, hi)
		top := r.find(fmt.Sprintf("%s, %d other backends", kind, hi), "add")
		if row == nil || top == nil || len(row.xen) == 0 || len(top.xen) == 0 {
			na(name)
		} else {
			q := float64(top.xen.median()) / float64(row.xen.median())
			ts = append(ts, target{name, verdict(q <= 1.2), fmt.Sprintf("%s → %s ms (%.2f×)", ms2(row.xen.median()), ms2(top.xen.median()), q)})
		}
	}
	one, sixteen := r.find("1 file disks at once (all done)", "add"), r.find("16 file disks at once (all done)", "add")
	name := "16 concurrent adds within 2× one add"
	if one == nil || sixteen == nil || len(one.xen) == 0 {
		na(name)
	} else {
		q := float64(sixteen.xen.median()) / float64(one.xen.median())
		ts = append(ts, target{name, verdict(q <= 2), fmt.Sprintf("%s vs %s ms (%.2f×)", ms2(sixteen.xen.median()), ms2(one.xen.median()), q)})
	}
	if r.roXen.attachments == 0 {
		na("read-only attachments of one image use 1 loop device")
		na("daemon ≤ 30 MiB RSS with them attached")
	} else {
		ro := r.roXen
		ts = append(ts, target{fmt.Sprintf("%d read-only attachments of one image use 1 loop device", ro.attachments),
			verdict(ro.loops == 1 && ro.physDevs == 1), fmt.Sprintf("%d loop devices (sysfs), %d distinct physical-device", ro.loops, ro.physDevs)})
		ts = append(ts, target{"daemon ≤ 30 MiB RSS with them attached", verdict(ro.rssKiB > 0 && ro.rssKiB <= 30<<10),
			fmt.Sprintf("VmRSS %.1f MiB", float64(ro.rssKiB)/1024)})
	}
	return ts
}

func (r *report) markdown() string {
	var w strings.Builder
	mode := "full"
	if r.cfg.quick {
		mode = "quick (smoke run: few iterations)"
	}
	fmt.Fprintf(&w, "# Benchmarks: stock `block` script vs xenblkd\n\n")
	fmt.Fprintf(&w, "Generated by `make bench` (`go run ./test/bench`, %s mode) on %s, %s–%s UTC. No hand-edited numbers.\n\n",
		mode, r.start.UTC().Format("2006-01-02"), r.start.UTC().Format("15:04"), r.end.UTC().Format("15:04"))
	for _, l := range machine() {
		fmt.Fprintf(&w, "- %s\n", l)
	}
	fmt.Fprintf(&w, "- load average at start %s, at end %s (a shared machine: other work ran during the bench; medians are reported)\n", r.loadStart, r.loadEnd)
	fmt.Fprintf(&w, "- XenStore: %s; bench client: %s\n", r.xenstored, r.client)
	fmt.Fprintf(&w, "- stock: `/etc/xen/scripts/block` from xen-utils-common %s\n", r.stockVersion)
	fmt.Fprintf(&w, "\nBoth peers are exec'd as libxl 4.17 execs a disk's script: argv `[script, add|remove]`, env `script=<path> "+
		"XENBUS_TYPE=vbd XENBUS_PATH=backend/vbd/<domid>/<devid> XENBUS_BASE_PATH=backend` + `XENSTORED_PATH`, stdin /dev/null. "+
		"Per iteration the libxl nodes and `state=2` are written in one transaction (untimed), `add` is timed exec to exit, "+
		"`physical-device` is checked, `remove` is timed, then the nodes are removed. Times in ms: **median** (min–max), n runs, "+
		"after one untimed warm-up. Ratio = stock median / xenblkd median.\n\n")
	fmt.Fprintf(&w, "| scenario | op | stock | xenblkd | ratio |\n|---|---|---|---|---|\n")
	for _, row := range r.rows {
		fmt.Fprintf(&w, "| %s | %s | %s%s | %s%s | %s |\n", row.scenario, row.op, cell(row.stock), r.failed("stock", row),
			cell(row.xen), r.failed("xenblkd", row), ratio(row.stock, row.xen))
	}
	fmt.Fprintf(&w, "\n⚠ k failed: k attempts of that peer failed (non-zero exit or no physical-device) and were retried, "+
		"up to 3 per iteration; only successful iterations are timed. See the notes.\n")
	fmt.Fprintf(&w, "\n![add latency vs existing backends](bench-scaling.png)\n")
	fmt.Fprintf(&w, "\n## Read-only attachments of one image (10 per domain)\n\n| peer | attachments | domains | add per attachment | remove | loop devices | distinct physical-device | daemon VmRSS |\n|---|---|---|---|---|---|---|---|\n")
	for _, p := range []struct {
		name string
		ro   roResult
	}{{"stock", r.roStock}, {"xenblkd", r.roXen}} {
		if p.ro.attachments == 0 {
			fmt.Fprintf(&w, "| %s | not run | | | | | | |\n", p.name)
			continue
		}
		rss := "—"
		if p.ro.rssKiB > 0 {
			rss = fmt.Sprintf("%.1f MiB", float64(p.ro.rssKiB)/1024)
		}
		fmt.Fprintf(&w, "| %s | %d | %d | %s | %s | %d | %d | %s |\n", p.name, p.ro.attachments, p.ro.domains, cell(p.ro.add), cell(p.ro.rm), p.ro.loops, p.ro.physDevs, rss)
	}
	fmt.Fprintf(&w, "\nThe stock script makes one loop device per attachment, so it runs only a small subset here (2,000 would need 2,000 loop devices).\n")
	fmt.Fprintf(&w, "\n## Exec-to-exit cost of the hotplug entry, for context\n\n| command | median (min–max) |\n|---|---|\n")
	for _, e := range r.entry {
		if e.err != "" {
			fmt.Fprintf(&w, "| %s | failed: %s |\n", e.what, strings.ReplaceAll(e.err, "\n", " "))
		} else {
			fmt.Fprintf(&w, "| %s | %s |\n", e.what, cell(e.s))
		}
	}
	fmt.Fprintf(&w, "\n## Targets (issue 6)\n\n| target | verdict | evidence |\n|---|---|---|\n")
	for _, t := range r.targets() {
		fmt.Fprintf(&w, "| %s | %s | %s |\n", t.name, t.verdict, t.evidence)
	}
	if len(r.notes) > 0 {
		fmt.Fprintf(&w, "\n## Notes from this run\n\n")
		for _, n := range r.notes {
			fmt.Fprintf(&w, "- %s\n", n)
		}
	}
	return w.String()
}

func (r *report) failed(peer string, row row) string {
	if row.op != "add" || r.fail[peer+"|"+row.scenario] == 0 {
		return ""
	}
	return fmt.Sprintf(" ⚠ %d failed", r.fail[peer+"|"+row.scenario])
}

func (r *report) print(w io.Writer) {
	fmt.Fprintf(w, "\n%-40s %-6s %28s %28s %8s\n", "scenario", "op", "stock ms med (min-max)", "xenblkd ms med (min-max)", "ratio")
	short := func(s sample) string {
		if len(s) == 0 {
			return "-"
		}
		return fmt.Sprintf("%s (%s-%s) n=%d", ms(s.median()), ms(s.min()), ms(s.max()), len(s))
	}
	for _, row := range r.rows {
		fmt.Fprintf(w, "%-40s %-6s %28s %28s %8s%s%s\n", row.scenario, row.op, short(row.stock), short(row.xen), ratio(row.stock, row.xen),
			strings.ReplaceAll(r.failed("stock", row), "⚠", " stock"), strings.ReplaceAll(r.failed("xenblkd", row), "⚠", " xenblkd"))
	}
	for _, p := range []struct {
		name string
		ro   roResult
	}{{"stock", r.roStock}, {"xenblkd", r.roXen}} {
		if p.ro.attachments > 0 {
			fmt.Fprintf(w, "read-only %-7s %d attachments/%d domains: add %s, remove %s, loops %d, physical-devices %d, rss %d KiB\n",
				p.name, p.ro.attachments, p.ro.domains, short(p.ro.add), short(p.ro.rm), p.ro.loops, p.ro.physDevs, p.ro.rssKiB)
		}
	}
	for _, e := range r.entry {
		if e.err != "" {
			fmt.Fprintf(w, "exec %-40s failed: %s\n", e.what, e.err)
		} else {
			fmt.Fprintf(w, "exec %-40s %s\n", e.what, short(e.s))
		}
	}
	fmt.Fprintln(w)
	for _, t := range r.targets() {
		fmt.Fprintf(w, "%-4s %s: %s\n", t.verdict, t.name, t.evidence)
	}
}
