package main

import (
	"fmt"
	"time"
)

// initWaitGap is how long libxl plausibly waits between committing a disk's
// backend and exec'ing its script: it waits for xen-blkback to write
// state=2 (InitWait), i.e. for the backend's probe in dom0's kernel.
const initWaitGap = 5 * time.Millisecond

// commitToExit measures add as libxl sees it: libxl's nodes are written in
// one transaction, then the script is exec'd at once, or after initWaitGap,
// and the time runs from the commit's reply to the script's exit. This is
// where pre-setup shows: the daemon starts the add on the commit's watch
// event, while libxl is still waiting and exec'ing.
func (b *bench) commitToExit(r *report, peers []*peer, fileImg string) error {
	n := r.cfg.n(counts{10, 100}, counts{2, 10})
	for _, kind := range []string{"file", "phy"} {
		params := fileImg
		if kind == "phy" {
			params = b.phyDev
		}
		for _, gap := range []time.Duration{0, initWaitGap} {
			when := "at once"
			if gap > 0 {
				when = fmt.Sprintf("%v after", gap)
			}
			add := row{scenario: fmt.Sprintf("%s, script exec'd %s the commit (commit→exit)", kind, when), op: "add", backends: -1}
			for _, p := range peers {
				cnt := n.stock
				if p.slot != slotStock {
					cnt = n.xen
				}
				if err := b.use(p); err != nil {
					return err
				}
				fmt.Printf("bench: %-17s %-28s x%d\n", p.name, add.scenario, cnt)
				b.scenario = add.scenario
				for i := range cnt + 1 { // +1 warm-up
					v := vbd{domid: 3000 + i, params: params, mode: "w"}
					var d time.Duration
					err := b.retry(p, v.xbPath(), func() (err error) {
						d, err = b.commitToExitOnce(p, v, gap)
						return err
					})
					if err != nil {
						if b.ctx.Err() != nil {
							return err
						}
						continue
					}
					if i > 0 {
						add.s[p.slot] = append(add.s[p.slot], d)
					}
				}
			}
			r.rows = append(r.rows, add)
		}
	}
	return nil
}

func (b *bench) commitToExitOnce(p *peer, v vbd, gap time.Duration) (time.Duration, error) {
	defer b.rmDomain(v.domid)
	if p.slot == slotStock {
		defer b.settleStock()
	}
	if err := b.setup(v, p); err != nil { // returns when the commit is answered
		return 0, err
	}
	t0 := time.Now()
	for d := time.Since(t0); d < gap; d = time.Since(t0) {
		time.Sleep(gap - d)
	}
	_, err := p.run("add", v.xbPath())
	d := time.Since(t0)
	if err == nil {
		err = b.checkAdded(v)
	}
	p.run("remove", v.xbPath())
	if cerr := b.cleanup(v); err == nil {
		err = cerr
	}
	return d, err
}
