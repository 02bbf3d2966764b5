package main

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Where an add's time goes (issue 6: "profile ... strace counts of syscalls
// and XenStore round trips per add"). Everything here is measured by the
// bench itself, in the same run:
//   - XenStore requests and round trips per add and per remove, counted by a
//     proxy the bench puts between the daemon and xenstored;
//   - the daemon's CPU per add (/proc/<pid>/task/*/schedstat);
//   - syscalls of the exec'd entry (strace -f -c) and of the daemon per add
//     (strace -f -c -p).

// xsProxy relays XenStore connections and counts requests. A round trip
// ("round") starts when a request is sent while none is outstanding: requests
// the client pipelines count as one round.
type xsProxy struct {
	l      net.Listener
	target string

	mu          sync.Mutex
	outstanding int            // guarded by mu
	rounds      int            // guarded by mu
	byType      map[uint32]int // guarded by mu: requests by XS_* type
}

var xsTypeNames = map[uint32]string{0: "control", 1: "directory", 2: "read", 3: "get-perms", 4: "watch", 5: "unwatch",
	6: "transaction-start", 7: "transaction-end", 10: "get-domain-path", 11: "write", 12: "mkdir", 13: "rm", 14: "set-perms"}

func startProxy(path, target string) (*xsProxy, error) {
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	p := &xsProxy{l: l, target: target, byType: map[uint32]int{}}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("unix", target)
			if err != nil {
				c.Close()
				continue
			}
			go p.relay(c, s, true)
			go p.relay(s, c, false)
		}
	}()
	return p, nil
}

// relay copies whole frames from src to dst, counting them.
func (p *xsProxy) relay(src, dst net.Conn, requests bool) {
	defer src.Close()
	defer dst.Close()
	r := bufio.NewReader(src)
	hdr := make([]byte, 16)
	for {
		if _, err := io.ReadFull(r, hdr); err != nil {
			return
		}
		typ, reqID, n := binary.LittleEndian.Uint32(hdr[0:]), binary.LittleEndian.Uint32(hdr[4:]), binary.LittleEndian.Uint32(hdr[12:])
		frame := make([]byte, 16+int(n))
		copy(frame, hdr)
		if _, err := io.ReadFull(r, frame[16:]); err != nil {
			return
		}
		p.mu.Lock()
		if requests {
			if p.outstanding == 0 {
				p.rounds++
			}
			p.outstanding++
			p.byType[typ]++
		} else if typ != 15 || reqID != 0 { // a reply (not a watch event)
			p.outstanding = max(0, p.outstanding-1)
		}
		p.mu.Unlock()
		if _, err := dst.Write(frame); err != nil {
			return
		}
	}
}

// take returns the counts since the last take and resets them.
func (p *xsProxy) take() (reqs, rounds int, byType map[uint32]int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, n := range p.byType {
		reqs += n
	}
	rounds, byType = p.rounds, p.byType
	p.rounds, p.byType = 0, map[uint32]int{}
	return
}

func (p *xsProxy) close() { p.l.Close() }

// daemonCPU is the CPU time of every thread of the daemon.
func daemonCPU(p *peer) time.Duration {
	if p.daemon == nil {
		return 0
	}
	m, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/schedstat", p.daemon.Process.Pid))
	var sum time.Duration
	for _, f := range m {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if f := strings.Fields(string(b)); len(f) > 0 {
			ns, _ := strconv.ParseInt(f[0], 10, 64)
			sum += time.Duration(ns)
		}
	}
	return sum
}

// peerProfile is one xenblkd configuration's add, through the proxy.
type peerProfile struct {
	name               string
	n                  int
	addReqs, addRounds float64 // per add (pre-setup's work included)
	rmReqs, rmRounds   float64 // per remove
	addByType          map[string]float64
	daemonCPUAdd       time.Duration // per add
	daemonCPURm        time.Duration // per remove
	rmLatency          sample        // exec to exit, through the proxy
	entryCPU           sample        // the exec'd entry's user+sys, per add
	addLatency         sample        // exec to exit, through the proxy
	straceDaemon       []syscallCount
	straceDaemonTotal  float64 // per add
	straceDaemonN      int
	straceErr          string
}

type syscallCount struct {
	name  string
	calls float64
}

type profileResult struct {
	peers      []peerProfile
	straceExec []execSyscalls
	straceErr  string
}

type execSyscalls struct {
	what  string
	total int
	top   []syscallCount
}

func (b *bench) profile(r *report, peers []*peer) error {
	n := r.cfg.n(counts{0, 50}, counts{0, 5}).xen
	img := b.dir + "/profile.img"
	if err := sparseFile(img, 1<<30); err != nil {
		return err
	}
	for _, p := range peers {
		if p.slot == slotStock {
			continue
		}
		fmt.Printf("bench: %-17s profile: XenStore requests per add (proxy) x%d\n", p.name, n)
		pp, err := b.profileXenStore(p, img, n)
		if err != nil {
			r.notef("profile %s: %v", p.name, err)
			continue
		}
		if p.slot == slotXen {
			b.straceDaemon(p, min(n, 16), &pp)
		}
		r.prof.peers = append(r.prof.peers, pp)
	}
	b.straceExecs(r)
	return nil
}

func (b *bench) profileXenStore(p *peer, img string, n int) (peerProfile, error) {
	pp := peerProfile{name: p.name, n: n, addByType: map[string]float64{}}
	for _, o := range b.peers {
		o.stop()
	}
	px, err := startProxy(b.dir+"/xs-proxy.sock", b.xsSocket)
	if err != nil {
		return pp, err
	}
	defer px.close()
	if err := p.start(px.l.Addr().String()); err != nil {
		return pp, err
	}
	defer p.stop()
	if b.r.cfg.perf != "" && p.slot == slotXen {
		rec := exec.Command("perf", "record", "-g", "-o", b.dir+"/perf.data", "-p", strconv.Itoa(p.daemon.Process.Pid))
		rec.Stdout, rec.Stderr = p.log, p.log
		if err := rec.Start(); err == nil {
			time.Sleep(300 * time.Millisecond)
			defer func() {
				rec.Process.Signal(syscall.SIGINT)
				rec.Wait()
				out, _ := exec.Command("perf", "report", "-i", b.dir+"/perf.data", "--stdio", "--children", "--sort", "sym", "-g", "none", "--percent-limit", "0.5").CombinedOutput()
				os.WriteFile(b.r.cfg.perf, out, 0o644)
			}()
		}
	}
	var addReqs, addRounds, rmReqs, rmRounds int
	var cpu, rmCPU time.Duration
	for i := range n {
		v := vbd{domid: 4000 + i, params: img, mode: "w"}
		time.Sleep(10 * time.Millisecond) // the previous iteration's watch events settle
		px.take()
		c0 := daemonCPU(p)
		if err := b.setup(v, p); err != nil {
			return pp, err
		}
		d, err := p.run("add", v.xbPath())
		if err == nil {
			err = b.checkAdded(v)
		}
		if err != nil {
			p.run("remove", v.xbPath())
			b.cleanup(v)
			b.rmDomain(v.domid)
			return pp, err
		}
		time.Sleep(5 * time.Millisecond) // pre-setup's own check may end after the script
		cpu += daemonCPU(p) - c0
		pp.entryCPU = append(pp.entryCPU, p.lastCPU)
		pp.addLatency = append(pp.addLatency, d)
		q, rounds, byType := px.take()
		addReqs, addRounds = addReqs+q, addRounds+rounds
		for t, k := range byType {
			name := xsTypeNames[t]
			if name == "" {
				name = fmt.Sprint(t)
			}
			pp.addByType[name] += float64(k) / float64(n)
		}
		time.Sleep(5 * time.Millisecond) // the add's watch events settle before remove is timed
		px.take()
		c1 := daemonCPU(p)
		dr, err := p.run("remove", v.xbPath())
		if err != nil {
			return pp, err
		}
		rmCPU += daemonCPU(p) - c1
		pp.rmLatency = append(pp.rmLatency, dr)
		q, rounds, _ = px.take()
		rmReqs, rmRounds = rmReqs+q, rmRounds+rounds
		b.cleanup(v)
		b.rmDomain(v.domid)
	}
	f := float64(n)
	pp.addReqs, pp.addRounds, pp.rmReqs, pp.rmRounds = float64(addReqs)/f, float64(addRounds)/f, float64(rmReqs)/f, float64(rmRounds)/f
	pp.daemonCPUAdd = cpu / time.Duration(n)
	pp.daemonCPURm = rmCPU / time.Duration(n)
	return pp, nil
}

// straceDaemon counts the daemon's syscalls over n adds (strace -f -c -p).
// Each add gets its own image (conc<i>.img of the concurrency scenario): the
// disks stay attached until the end, and mode w refuses a shared file.
func (b *bench) straceDaemon(p *peer, n int, pp *peerProfile) {
	if _, err := exec.LookPath("strace"); err != nil {
		pp.straceErr = "strace not installed"
		return
	}
	if err := b.use(p); err != nil {
		pp.straceErr = err.Error()
		return
	}
	defer p.stop()
	out := b.dir + "/strace-daemon.txt"
	st := exec.Command("strace", "-f", "-c", "-o", out, "-p", strconv.Itoa(p.daemon.Process.Pid))
	st.Stderr = p.log
	if err := st.Start(); err != nil {
		pp.straceErr = err.Error()
		return
	}
	time.Sleep(500 * time.Millisecond) // attach to every thread
	var vs []vbd
	for i := range n {
		v := vbd{domid: 4500 + i, params: fmt.Sprintf("%s/conc%d.img", b.dir, i), mode: "w"}
		if err := b.setup(v, p); err != nil {
			break
		}
		vs = append(vs, v)
		if _, err := p.run("add", v.xbPath()); err != nil {
			pp.straceErr = err.Error()
			break
		}
	}
	st.Process.Signal(syscall.SIGINT) // strace detaches and writes its summary
	st.Wait()
	for _, v := range vs {
		p.run("remove", v.xbPath())
		b.cleanup(v)
		b.rmDomain(v.domid)
	}
	total, top, err := parseStraceC(out)
	if err != nil {
		pp.straceErr = err.Error()
		return
	}
	pp.straceDaemonN = len(vs)
	pp.straceDaemonTotal = float64(total) / float64(len(vs))
	for _, c := range top {
		pp.straceDaemon = append(pp.straceDaemon, syscallCount{c.name, c.calls / float64(len(vs))})
	}
}

// straceExecs counts the syscalls of one exec of the entry (against a daemon
// that answers at once), of `xenblkd version` and of an empty Go program.
func (b *bench) straceExecs(r *report) {
	if _, err := exec.LookPath("strace"); err != nil {
		r.prof.straceErr = "strace not installed"
		return
	}
	xen := peerInSlot(b.peers, slotXen)
	if xen == nil {
		return
	}
	sock, stop, err := fakeDaemon(b.dir + "/fake-api2.sock")
	if err != nil {
		r.prof.straceErr = err.Error()
		return
	}
	defer stop()
	env := []string{basePath, "script=" + xen.script, "XENBUS_TYPE=vbd", "XENBUS_PATH=backend/vbd/1/51712",
		"XENBUS_BASE_PATH=backend", "XENBLKD_SOCKET=" + sock, "XENSTORED_PATH=" + b.dir + "/no-xenstored"}
	for _, c := range []struct {
		what string
		argv []string
		env  []string
	}{
		{execFloor, []string{b.dir + "/floor/floor"}, nil},
		{emptyGo, []string{b.dir + "/empty/empty"}, nil},
		{"xenblkd version", []string{xen.bin, "version"}, nil},
		{entryAdd, []string{xen.script, "add"}, env},
		{goEntryAdd, []string{xen.bin, "add"}, env},
	} {
		out := b.dir + "/strace-exec.txt"
		cmd := exec.Command("strace", append([]string{"-f", "-c", "-o", out}, c.argv...)...)
		cmd.Env = c.env
		if o, err := cmd.CombinedOutput(); err != nil {
			r.prof.straceErr = fmt.Sprintf("strace %s: %v %.200s", c.what, err, o)
			continue
		}
		total, top, err := parseStraceC(out)
		if err != nil {
			r.prof.straceErr = err.Error()
			continue
		}
		r.prof.straceExec = append(r.prof.straceExec, execSyscalls{c.what, total, top})
	}
}

// parseStraceC reads strace -c's table: the total and the calls per syscall,
// most first.
func parseStraceC(path string) (total int, calls []syscallCount, err error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, nil, err
	}
	for _, l := range strings.Split(string(data), "\n") {
		f := strings.Fields(l)
		if len(f) < 5 || strings.HasPrefix(l, "%") || strings.HasPrefix(l, "-") {
			continue
		}
		name := f[len(f)-1]
		// calls is the 4th column; errors (optional) the 5th.
		n, err := strconv.Atoi(f[3])
		if err != nil {
			continue
		}
		if name == "total" {
			total = n
			continue
		}
		calls = append(calls, syscallCount{name, float64(n)})
	}
	if total == 0 {
		return 0, nil, fmt.Errorf("no strace -c summary in %s", path)
	}
	sort.Slice(calls, func(i, j int) bool { return calls[i].calls > calls[j].calls })
	return total, calls, nil
}
