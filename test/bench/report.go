package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strings"
	"time"
)

type report struct {
	cfg                config
	start, end         time.Time
	xenstored, client  string
	stockVersion       string
	rows               []row
	ro                 [nSlots]roResult
	entry              []entryRow
	fast               []fastRow    // fastpath.go
	cluster            []clusterRow // cluster.go
	prof               profileResult
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

// targets from issue 6, checked against this run's numbers, for each
// xenblkd configuration (pre-setup off, and on: the default).
func (r *report) targets() []target {
	var ts []target
	verdict := func(ok bool) string {
		if ok {
			return "PASS"
		}
		return "MISS"
	}
	for _, slot := range []int{slotXen, slotPre} {
		who := slotNames[slot]
		na := func(name string) { ts = append(ts, target{name, "N/A", who + " not measured in this run"}) }
		for _, kind := range []string{"file", "phy"} {
			row := r.find(kind+", 0 other backends", "add")
			name := fmt.Sprintf("%s: %s add at 0 backends ≥ 40× faster than stock and ≤ 2.1 ms", who, kind)
			if row == nil || len(row.s[slot]) == 0 {
				na(name)
			} else {
				x, s := row.s[slot].median(), row.s[slotStock].median()
				ts = append(ts, target{name, verdict(float64(s)/float64(x) >= 40 && x <= 2100*time.Microsecond),
					fmt.Sprintf("stock %s ms / %s ms = %s", ms2(s), ms2(x), ratio(row.s[slotStock], row.s[slot]))})
			}
			name = fmt.Sprintf("%s: %s add faster than qubes-block (~3.5 ms)", who, kind)
			if row == nil || len(row.s[slot]) == 0 {
				na(name)
			} else {
				ts = append(ts, target{name, verdict(row.s[slot].median() < 3500*time.Microsecond), ms2(row.s[slot].median()) + " ms"})
			}
			hi := r.cfg.backends[len(r.cfg.backends)-1]
			name = fmt.Sprintf("%s: %s add flat (≤ 1.2×) from 0 to %d backends", who, kind, hi)
			top := r.find(fmt.Sprintf("%s, %d other backends", kind, hi), "add")
			if row == nil || top == nil || len(row.s[slot]) == 0 || len(top.s[slot]) == 0 {
				na(name)
			} else {
				q := float64(top.s[slot].median()) / float64(row.s[slot].median())
				ts = append(ts, target{name, verdict(q <= 1.2), fmt.Sprintf("%s → %s ms (%.2f×)", ms2(row.s[slot].median()), ms2(top.s[slot].median()), q)})
			}
		}
		one, sixteen := r.find("1 file disks at once (all done)", "add"), r.find("16 file disks at once (all done)", "add")
		name := who + ": 16 concurrent adds within 2× one add"
		if one == nil || sixteen == nil || len(one.s[slot]) == 0 || len(sixteen.s[slot]) == 0 {
			na(name)
		} else {
			q := float64(sixteen.s[slot].median()) / float64(one.s[slot].median())
			ev := fmt.Sprintf("%s vs %s ms (%.2f×)", ms2(sixteen.s[slot].median()), ms2(one.s[slot].median()), q)
			if f, ok := r.floor16(entryAdd); ok {
				ev += fmt.Sprintf("; CPU floor of 16 exec'd entries alone on %d cores: %s ms (see Profile)", runtime.NumCPU(), ms2(f))
			}
			ts = append(ts, target{name, verdict(q <= 2), ev})
		}
		if ro := r.ro[slot]; ro.attachments == 0 {
			na("read-only attachments of one image use 1 loop device")
			na("daemon ≤ 30 MiB RSS with them attached")
		} else {
			ts = append(ts, target{fmt.Sprintf("%s: %d read-only attachments of one image use 1 loop device", who, ro.attachments),
				verdict(ro.loops == 1 && ro.physDevs == 1), fmt.Sprintf("%d loop devices (sysfs), %d distinct physical-device", ro.loops, ro.physDevs)})
			ts = append(ts, target{who + ": daemon ≤ 30 MiB RSS with them attached", verdict(ro.rssKiB > 0 && ro.rssKiB <= 30<<10),
				fmt.Sprintf("VmRSS %.1f MiB", float64(ro.rssKiB)/1024)})
		}
	}
	return ts
}

// floor16 is the least time 16 concurrent adds can take on this machine's
// cores: the CPU (rusage) of 16 exec'd entries alone, / cores. The daemon's
// own CPU comes on top. (A sum with the daemon's CPU per sequential add
// overstates it: an idle Go daemon spins and wakes per request, a busy one
// amortises that.)
func (r *report) floor16(what string) (time.Duration, bool) {
	for _, e := range r.entry {
		if e.what == what && len(e.cpu) > 0 {
			return 16 * e.cpu.median() / time.Duration(runtime.NumCPU()), true
		}
	}
	return 0, false
}

const (
	entryAdd   = "xenblkd add (C entry), daemon answers at once"
	goEntryAdd = "xenblkd add (Go entry, the hand-over path), daemon answers at once"
	emptyGo    = "empty Go program (static)"
	execFloor  = "exec floor: empty static C program"
)

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
	fmt.Fprintf(&w, "\nThe peers are exec'd as libxl (4.17 to 4.20) execs a disk's script: argv `[script, add|remove]`, env `script=<path> "+
		"XENBUS_TYPE=vbd XENBUS_PATH=backend/vbd/<domid>/<devid> XENBUS_BASE_PATH=backend` + `XENSTORED_PATH`, stdin /dev/null. "+
		"xenblkd runs twice, as two peers: its daemon with `--presetup=false` (column *xenblkd*: the exec'd add does the whole add) "+
		"and with `--presetup=true`, the default (column *xenblkd pre-setup*: the daemon starts the add on the watch event of "+
		"libxl's transaction); only one daemon runs at a time, none while stock runs. "+
		"Per iteration the libxl nodes and `state=2` are written in one transaction (untimed) for a fresh domid, `add` is timed exec to exit "+
		"(the script is exec'd as soon as the commit is answered), `physical-device` is checked, `remove` is timed, then the nodes are removed. "+
		"The *commit→exit* rows time from the commit's reply to the script's exit, the script exec'd at once or after a %v gap "+
		"(libxl waits for blkback's InitWait before it execs the script). Times in ms: **median** (min–max), n runs, "+
		"after one untimed warm-up. Ratio = stock median / xenblkd median.\n\n", initWaitGap)
	r.fastMarkdown(&w)
	r.clusterMarkdown(&w)
	if ts := r.fastTargets(); len(ts) > 0 {
		fmt.Fprintf(&w, "\n| target (issue 13) | verdict | evidence |\n|---|---|---|\n")
		for _, t := range ts {
			fmt.Fprintf(&w, "| %s | %s | %s |\n", t.name, t.verdict, t.evidence)
		}
	}
	fmt.Fprintf(&w, "\n## All scenarios\n\n")
	fmt.Fprintf(&w, "| scenario | op | stock | xenblkd | xenblkd pre-setup | ratio | ratio pre-setup |\n|---|---|---|---|---|---|---|\n")
	for _, row := range r.rows {
		fmt.Fprintf(&w, "| %s | %s |", row.scenario, row.op)
		for slot := range nSlots {
			fmt.Fprintf(&w, " %s%s |", cell(row.s[slot]), r.failed(slot, row))
		}
		fmt.Fprintf(&w, " %s | %s |\n", ratio(row.s[slotStock], row.s[slotXen]), ratio(row.s[slotStock], row.s[slotPre]))
	}
	fmt.Fprintf(&w, "\n⚠ k failed: k attempts of that peer failed (non-zero exit or no physical-device) and were retried, "+
		"up to 3 per iteration; only successful iterations are timed. See the notes.\n")
	fmt.Fprintf(&w, "\n![add latency vs existing backends](bench-scaling.png)\n")
	fmt.Fprintf(&w, "\n## Read-only attachments of one image (10 per domain)\n\n| peer | attachments | domains | add per attachment | remove | loop devices | distinct physical-device | daemon VmRSS |\n|---|---|---|---|---|---|---|---|\n")
	for slot, ro := range r.ro {
		if ro.attachments == 0 {
			fmt.Fprintf(&w, "| %s | not run | | | | | | |\n", slotNames[slot])
			continue
		}
		rss := "—"
		if ro.rssKiB > 0 {
			rss = fmt.Sprintf("%.1f MiB", float64(ro.rssKiB)/1024)
		}
		fmt.Fprintf(&w, "| %s | %d | %d | %s | %s | %d | %d | %s |\n", slotNames[slot], ro.attachments, ro.domains, cell(ro.add), cell(ro.rm), ro.loops, ro.physDevs, rss)
	}
	fmt.Fprintf(&w, "\nThe stock script makes one loop device per attachment, so it runs only a small subset here (2,000 would need 2,000 loop devices).\n")
	fmt.Fprintf(&w, "\n## Exec-to-exit cost of the hotplug entry, for context\n\n| command | wall, median (min–max) | CPU user+sys (rusage), median |\n|---|---|---|\n")
	for _, e := range r.entry {
		if e.err != "" {
			fmt.Fprintf(&w, "| %s | failed: %s | |\n", e.what, strings.ReplaceAll(e.err, "\n", " "))
		} else {
			fmt.Fprintf(&w, "| %s | %s | %s |\n", e.what, cell(e.s), ms2(e.cpu.median()))
		}
	}
	r.profileMarkdown(&w)
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

// profileMarkdown writes where an add's time goes (profile.go).
func (r *report) profileMarkdown(w *strings.Builder) {
	p := r.prof
	if len(p.peers) == 0 && len(p.straceExec) == 0 {
		return
	}
	fmt.Fprintf(w, "\n## Profile: where an add's time goes\n\n")
	fmt.Fprintf(w, "Measured by the bench in this run (test/bench/profile.go): XenStore requests counted by a proxy the bench puts "+
		"between the daemon and xenstored (a *round trip* starts when a request is sent while none is outstanding, so pipelined "+
		"requests count once); the daemon's CPU from `/proc/<pid>/task/*/schedstat` (the add's window: backend write, exec, pre-setup's work); "+
		"the entry's CPU from its rusage. The latency column goes through the proxy (one extra hop per round trip).\n\n")
	fmt.Fprintf(w, "| daemon | n | XenStore requests / round trips per add | per remove | requests per add by type | daemon CPU per add | entry CPU per add | add exec→exit via proxy | daemon CPU per remove | remove exec→exit via proxy |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for _, pp := range p.peers {
		var types []string
		for t, n := range pp.addByType {
			types = append(types, fmt.Sprintf("%s %.1f", t, n))
		}
		sort.Strings(types)
		fmt.Fprintf(w, "| %s | %d | %.1f / %.1f | %.1f / %.1f | %s | %s ms | %s ms | %s | %s ms | %s |\n", pp.name, pp.n, pp.addReqs, pp.addRounds,
			pp.rmReqs, pp.rmRounds, strings.Join(types, ", "), ms2(pp.daemonCPUAdd), ms2(pp.entryCPU.median()), cell(pp.addLatency),
			ms2(pp.daemonCPURm), cell(pp.rmLatency))
	}
	if f, ok := r.floor16(entryAdd); ok {
		fe, _ := r.floor16(emptyGo)
		fmt.Fprintf(w, "\nCPU floor of 16 concurrent adds on %d cores, from the exec'd entries alone (the daemon's work comes on top): "+
			"16 × %s ms (CPU of one exec of the C entry, table above) / %d = **%s ms**; with an empty Go program as the entry it would be %s ms.",
			runtime.NumCPU(), ms2(f*time.Duration(runtime.NumCPU())/16), runtime.NumCPU(), ms2(f), ms2(fe))
		for _, slot := range []int{slotXen, slotPre} {
			if one := r.find("1 file disks at once (all done)", "add"); one != nil && len(one.s[slot]) > 0 {
				two := 2 * one.s[slot].median()
				fmt.Fprintf(w, " %s: the target, 2× one add, is %s ms: %s.", slotNames[slot], ms2(two),
					map[bool]string{true: "below the floor, out of reach on this machine", false: "above the entries' floor"}[f > two])
			}
		}
		fmt.Fprintln(w)
	}
	for _, pp := range p.peers {
		if pp.straceErr != "" {
			fmt.Fprintf(w, "\n%s: strace of the daemon: %s\n", pp.name, pp.straceErr)
		}
		if pp.straceDaemonN == 0 {
			continue
		}
		var top []string
		for i, c := range pp.straceDaemon {
			if i == 12 {
				break
			}
			top = append(top, fmt.Sprintf("%s %.1f", c.name, c.calls))
		}
		fmt.Fprintf(w, "\n%s daemon, `strace -f -c -p <daemon pid>` over %d adds: **%.1f syscalls per add**; per add: %s.\n",
			pp.name, pp.straceDaemonN, pp.straceDaemonTotal, strings.Join(top, ", "))
	}
	if len(p.straceExec) > 0 {
		fmt.Fprintf(w, "\nOne exec, `strace -f -c <command>` (all threads):\n\n| command | syscalls | most frequent |\n|---|---|---|\n")
		for _, e := range p.straceExec {
			var top []string
			for i, c := range e.top {
				if i == 8 {
					break
				}
				top = append(top, fmt.Sprintf("%s %.0f", c.name, c.calls))
			}
			fmt.Fprintf(w, "| %s | %d | %s |\n", e.what, e.total, strings.Join(top, ", "))
		}
	}
	if p.straceErr != "" {
		fmt.Fprintf(w, "\nstrace: %s\n", p.straceErr)
	}
}

func (r *report) failed(slot int, row row) string {
	k := r.fail[slotPeer[slot]+"|"+row.scenario]
	if row.op != "add" || k == 0 {
		return ""
	}
	return fmt.Sprintf(" ⚠ %d failed", k)
}

// slotPeer: the peer name of each column (failure counts are by peer name).
var slotPeer = [nSlots]string{"stock", "xenblkd", "xenblkd-presetup"}

func (r *report) print(w io.Writer) {
	fmt.Fprintf(w, "\n%-58s %-6s %24s %24s %24s %7s %7s\n", "scenario", "op", "stock", "xenblkd", "xenblkd pre-setup", "ratio", "ratio/p")
	short := func(s sample) string {
		if len(s) == 0 {
			return "-"
		}
		return fmt.Sprintf("%s (%s-%s) n=%d", ms(s.median()), ms(s.min()), ms(s.max()), len(s))
	}
	for _, row := range r.rows {
		fmt.Fprintf(w, "%-58s %-6s %24s %24s %24s %7s %7s", row.scenario, row.op, short(row.s[0]), short(row.s[1]), short(row.s[2]),
			ratio(row.s[slotStock], row.s[slotXen]), ratio(row.s[slotStock], row.s[slotPre]))
		for slot := range nSlots {
			fmt.Fprint(w, strings.ReplaceAll(r.failed(slot, row), "⚠", " "+slotPeer[slot]))
		}
		fmt.Fprintln(w)
	}
	for slot, ro := range r.ro {
		if ro.attachments > 0 {
			fmt.Fprintf(w, "read-only %-17s %d attachments/%d domains: add %s, remove %s, loops %d, physical-devices %d, rss %d KiB\n",
				slotNames[slot], ro.attachments, ro.domains, short(ro.add), short(ro.rm), ro.loops, ro.physDevs, ro.rssKiB)
		}
	}
	for _, e := range r.entry {
		if e.err != "" {
			fmt.Fprintf(w, "exec %-40s failed: %s\n", e.what, e.err)
		} else {
			fmt.Fprintf(w, "exec %-40s %s cpu %s\n", e.what, short(e.s), ms2(e.cpu.median()))
		}
	}
	var pw strings.Builder
	r.fastMarkdown(&pw)
	r.clusterMarkdown(&pw)
	r.profileMarkdown(&pw)
	fmt.Fprint(w, pw.String())
	fmt.Fprintln(w)
	for _, t := range append(r.targets(), r.fastTargets()...) {
		fmt.Fprintf(w, "%-4s %s: %s\n", t.verdict, t.name, t.evidence)
	}
}
