// Command bench drives the stock Xen `block` hotplug script and xenblkd
// identically, as libxl (4.17 to 4.20) drives a disk's script, against the same private
// real C xenstored in the same run, and writes docs/benchmarks.md and
// docs/bench-scaling.png (issue 6). Run it as root: `make bench`, or
//
//	go run ./test/bench -quick            # smoke run, prints only
//	go run ./test/bench -out docs/benchmarks.md -plot docs/bench-scaling.png
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"xenblkd/test/looptest"
	"xenblkd/test/mdsection"
)

// benchIOSection is the part of docs/benchmarks.md that make bench-io
// (test/benchio) writes.
const benchIOSection = "bench-io"

type config struct {
	quick      bool
	stockOnly  bool
	bin        string
	entry      string // the C hotplug entry (the script libxl execs)
	daemonArgs string
	out, plot  string
	backends   []int
	onlyProf   bool   // skip the scenarios: entry cost and profile only
	onlyClust  bool   // only cluster mode's lease beside no lease (cluster.go)
	perf       string // write `perf report` of the daemon during the profile here
}

func main() {
	var c config
	flag.BoolVar(&c.quick, "quick", false, "smoke run: few iterations, smaller read-only scenario")
	flag.BoolVar(&c.stockOnly, "stock-only", false, "measure only the stock script")
	flag.BoolVar(&c.onlyClust, "cluster-only", false, "measure only cluster mode: add/remove with a sanlock lease beside without")
	flag.StringVar(&c.bin, "bin", "bin/xenblkd", "xenblkd binary (build with `make build`)")
	flag.StringVar(&c.entry, "entry", "bin/xenblkd-hotplug", "the C hotplug entry, exec'd as the script (build with `make build`)")
	flag.StringVar(&c.daemonArgs, "daemon-args", "daemon --socket {socket}", "how to start the daemon; {socket} is the private API socket")
	flag.StringVar(&c.out, "out", "", "write the markdown report here (e.g. docs/benchmarks.md)")
	flag.StringVar(&c.plot, "plot", "", "write the scaling plot PNG here (e.g. docs/bench-scaling.png)")
	flag.BoolVar(&c.onlyProf, "profile-only", false, "run only the entry cost and the profile (no table)")
	flag.StringVar(&c.perf, "perf", "", "perf record the daemon (pre-setup off) during the profile; write perf report here")
	backends := flag.String("backends", "0,100,1000", "numbers of unrelated backends for the scaling scenario")
	flag.Parse()
	for _, f := range strings.Split(*backends, ",") {
		var n int
		fmt.Sscan(f, &n)
		c.backends = append(c.backends, n)
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: must run as root (loop devices, the stock script)")
		os.Exit(1)
	}
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(c config) (err error) {
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	dir, err := os.MkdirTemp("/var/tmp", "xenblkd-bench-")
	if err != nil {
		return err
	}
	r := &report{cfg: c, start: time.Now(), fail: map[string]int{}}
	if l, err := os.ReadFile("/proc/loadavg"); err == nil {
		r.loadStart = strings.Join(strings.Fields(string(l))[:3], " ")
	}
	b := &bench{ctx: ctx, dir: dir, r: r}
	var peers []*peer
	stopXenstored := func() {}
	defer func() {
		// Order matters: the daemon first (its loop devices autoclear when it
		// exits), then whatever loop device is still backed by our files.
		for _, p := range peers {
			p.stop()
		}
		for _, dev := range b.leftoverLoops() {
			r.notef("cleanup: detached leftover %s (backed by %s)", dev, backingFile(dev))
			exec.Command("losetup", "-d", dev).Run()
		}
		if b.phy != nil {
			if derr := b.phy.Detach(); derr != nil {
				fmt.Fprintf(os.Stderr, "bench: detach %s: %v\n", b.phyDev, derr)
			}
		}
		if b.xs != nil {
			b.xs.Close()
		}
		stopXenstored()
		os.RemoveAll(dir)
	}()

	xsd, stop, err := startXenstored()
	if err != nil {
		return fmt.Errorf("private xenstored: %w", err)
	}
	stopXenstored = stop
	r.xenstored = fmt.Sprintf("private C xenstored (Debian %s), pid %d, socket %s", pkgVersion("xen-utils-"+xsd.XenVersion), xsd.Pid, xsd.Socket)
	b.xs, r.client, err = dialStore(ctx, xsd.Socket)
	if err != nil {
		return fmt.Errorf("connect to private xenstored: %w", err)
	}
	if err := b.xs.WriteTx(ctx, [][2]string{{"/local/domain/0/name", "Domain-0"}}); err != nil {
		return err
	}

	// The phy: disk: a loop device the bench makes on its own file.
	b.phyFile = dir + "/phy.img"
	if err := sparseFile(b.phyFile, 256<<20); err != nil {
		return err
	}
	phy, err := looptest.Bind(b.phyFile)
	if err != nil {
		return err
	}
	b.phy, b.phyDev = phy, phy.Path

	log, err := os.Create(dir + "/hotplug.log")
	if err != nil {
		return err
	}
	defer log.Close()
	stock := &peer{name: "stock", script: "/etc/xen/scripts/block", log: log, extraEnv: []string{"XENSTORED_PATH=" + xsd.Socket}}
	if _, err := os.Stat(stock.script); err != nil {
		return fmt.Errorf("stock script: %w (run scripts/setup.sh)", err)
	}
	peers = append(peers, stock)
	b.xsSocket = xsd.Socket
	if !c.stockOnly {
		script, err := installEntry(c.entry, dir)
		if ok, why := xenblkdAvailable(c.bin); !ok || err != nil {
			if err != nil {
				why = err.Error()
			}
			r.notef("xenblkd half NOT run: %s", why)
		} else {
			for _, x := range []*peer{
				newXenblkd("xenblkd", slotXen, c.bin, script, c.daemonArgs, "--presetup=false", dir, xsd.Socket, log),
				newXenblkd("xenblkd-presetup", slotPre, c.bin, script, c.daemonArgs, "--presetup=true", dir, xsd.Socket, log),
			} {
				err := x.start(xsd.Socket) // a first start proves it works; bench.use restarts it
				x.stop()
				if err != nil {
					r.notef("%s NOT run: %v", x.name, err)
					continue
				}
				peers = append(peers, x)
			}
		}
	} else {
		r.notef("xenblkd half not run (-stock-only)")
	}
	b.peers = peers
	r.stockVersion = pkgVersion("xen-utils-common")

	fmt.Printf("bench: work dir %s, phy disk %s, %s\n", dir, b.phyDev, r.client)
	if err := scenarios(b, r, peers); err != nil {
		return err
	}
	r.end = time.Now()
	if l, err := os.ReadFile("/proc/loadavg"); err == nil {
		r.loadEnd = strings.Join(strings.Fields(string(l))[:3], " ")
	}
	r.print(os.Stdout)
	if c.out != "" {
		doc := r.markdown()
		// make bench-io owns its own section of the same file: keep it.
		if old, err := os.ReadFile(c.out); err == nil {
			if io := mdsection.Extract(string(old), benchIOSection); io != "" {
				doc = strings.TrimRight(doc, "\n") + "\n\n" + io + "\n"
			}
		}
		if err := os.WriteFile(c.out, []byte(doc), 0o644); err != nil {
			return err
		}
		fmt.Println("bench: wrote", c.out)
	}
	if c.plot != "" {
		if err := writePlot(c.plot, r); err != nil {
			return err
		}
		fmt.Println("bench: wrote", c.plot)
	}
	return nil
}

func pkgVersion(pkg string) string {
	out, err := exec.Command("dpkg-query", "-W", "-f=${Version}", pkg).Output()
	if err != nil {
		return "?"
	}
	return string(out)
}
