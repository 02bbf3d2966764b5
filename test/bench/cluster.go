package main

import (
	"fmt"
	"strings"
	"time"

	"xenblkd/test/sanlockd"
)

// clusterRow is one daemon configuration's add and remove of one kind of
// disk, with or without cluster mode's lease (docs/cluster.md).
type clusterRow struct {
	peer, kind string
	add, rm    sample
}

// clusterCost measures what a sanlock lease adds to an add and a remove:
// xenblkd without and with cluster mode, each with and without pre-setup,
// on the same file and phy: disks, in this run. The lease is real: a
// private sanlock daemon (watchdog off) and a lockspace file in the work
// directory (ext4 or whatever /var/tmp is), io_timeout 1 s; every disk of
// the bench is under the share, so each add acquires and each remove
// releases an exclusive lease.
func (b *bench) clusterCost(r *report) error {
	var tmpl *peer
	for _, p := range b.peers {
		if p.bin != "" {
			tmpl = p
		}
	}
	if tmpl == nil {
		return nil
	}
	san, stop, err := sanlockd.StartMain()
	if err != nil {
		r.notef("cluster mode not measured: %v", err)
		return nil
	}
	defer stop()
	ls, err := san.InitLockspace(b.dir, "xbbench", 1)
	if err != nil {
		r.notef("cluster mode not measured: %v", err)
		return nil
	}
	cluster := fmt.Sprintf(" --cluster-lockspace %s:%s --cluster-host-id 1 --cluster-shares %s --sanlock-dir %s",
		ls.Name, ls.Disk.Path, b.dir, san.Dir)
	var peers []*peer
	for _, presetup := range []string{"false", "true"} {
		for _, lease := range []bool{false, true} {
			name, extra := "xenblkd", "--presetup="+presetup
			if presetup == "true" {
				name += " pre-setup"
			}
			if lease {
				name, extra = name+" + lease", extra+cluster
			}
			peers = append(peers, newXenblkd(strings.ReplaceAll(name, " ", "-"), slotXen, r.cfg.bin, tmpl.script,
				r.cfg.daemonArgs, extra, b.dir, b.xsSocket, tmpl.log))
			peers[len(peers)-1].name = name
		}
	}
	n := r.cfg.n(counts{xen: 100}, counts{xen: 10}).xen
	b.scenario = "cluster"
	for _, p := range peers {
		for _, o := range b.peers {
			o.stop()
		}
		if err := p.start(b.xsSocket); err != nil {
			r.notef("cluster mode: %s NOT run: %v", p.name, err)
			continue
		}
		for _, kind := range []string{"file", "phy"} {
			target := b.dir + "/disk.img"
			if kind == "phy" {
				target = b.phyDev
			}
			fmt.Printf("bench: %-23s cluster: %s add/remove x%d\n", p.name, kind, n)
			row := clusterRow{peer: p.name, kind: kind}
			for i := range n + 1 { // +1 warm-up
				v := vbd{domid: 7000 + i, params: target, mode: "w"}
				add, rm, err := b.clusterOnce(p, v)
				if err != nil {
					if b.ctx.Err() != nil {
						p.stop()
						return err
					}
					r.fail[p.name+"|cluster"]++
					continue
				}
				if i > 0 {
					row.add, row.rm = append(row.add, add), append(row.rm, rm)
				}
			}
			r.cluster = append(r.cluster, row)
		}
		p.stop()
	}
	return nil
}

// clusterOnce writes libxl's nodes, waits initWaitGap as libxl waits for
// blkback, times add (checked) and remove, and removes the nodes.
func (b *bench) clusterOnce(p *peer, v vbd) (add, rm time.Duration, err error) {
	defer b.rmDomain(v.domid)
	if err := b.setup(v, p); err != nil {
		return 0, 0, err
	}
	time.Sleep(initWaitGap)
	add, err = p.run("add", v.xbPath())
	if err == nil {
		err = b.checkAdded(v)
	}
	if err != nil {
		p.run("remove", v.xbPath())
		b.cleanup(v)
		return 0, 0, err
	}
	if rm, err = p.run("remove", v.xbPath()); err != nil {
		return 0, 0, err
	}
	return add, rm, b.cleanup(v)
}

// clusterMarkdown writes the cluster rows: each configuration's add and
// remove without the lease beside with it.
func (r *report) clusterMarkdown(w *strings.Builder) {
	if len(r.cluster) == 0 {
		return
	}
	fmt.Fprintf(w, "\n### Cluster mode: add and remove with a sanlock lease\n\n"+
		"The same disks, one daemon at a time, without and with `--cluster-lockspace` (a private sanlock daemon, "+
		"watchdog off, lockspace io_timeout 1 s, lease files in the work directory; every disk is under the share, "+
		"so each add acquires an exclusive lease and each remove releases it; [cluster.md](cluster.md)). "+
		"Times in ms: **median** (min–max), n runs, exec to exit.\n\n"+
		"| daemon | disk | add | remove |\n|---|---|---|---|\n")
	for _, c := range r.cluster {
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", c.peer, c.kind, cell(c.add), cell(c.rm))
	}
}
