package main

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Scenario "file add, 1,000 other loop devices": the add of the daemon
// without pre-setup (the exec'd add does the sharing check itself), with the
// host's loop devices as they are, then with 1,000 other loop devices bound
// (each to its own sparse file) plus 1,000 unbound loop nodes. The add must
// stay flat (≤ 1.1×): the sharing check asks the daemon's loop.Index, not
// every device. The devices sit at indexes of the bench's own (60000–61999,
// far above what a host allocates) and are freed at the end: each bound one
// by closing its own fd (AUTOCLEAR), then every node by LOOP_CTL_REMOVE of
// its index.
const (
	otherLoops       = 1000
	otherBoundBase   = 60000
	otherUnboundBase = 61000
)

func (b *bench) loopScaling(r *report, peers []*peer) error {
	p := peerInSlot(peers, slotXen)
	if p == nil {
		return nil
	}
	if err := b.use(p); err != nil {
		return err
	}
	defer p.stop()
	img := b.dir + "/loops.img"
	if err := sparseFile(img, 1<<30); err != nil {
		return err
	}
	n := r.cfg.n(counts{0, 200}, counts{0, 20}).xen
	measure := func(scenario string) (row, row, error) {
		add := row{scenario: scenario, op: "add", backends: -1}
		rm := row{scenario: scenario, op: "remove", backends: -1}
		fmt.Printf("bench: %-17s %-28s x%d\n", p.name, scenario, n)
		b.scenario = scenario
		a, m, err := b.addRemove(p, vbd{domid: 1, params: img, mode: "w"}, n, true)
		add.s[p.slot], rm.s[p.slot] = a, m
		return add, rm, err
	}
	add0, rm0, err := measure("file, host's loop devices only")
	if err != nil {
		return err
	}
	others, err := bindOtherLoops(b.dir)
	defer others.free(r)
	if err != nil {
		return err
	}
	add1, rm1, err := measure(fmt.Sprintf("file, +%d bound +%d unbound loop devices", otherLoops, otherLoops))
	if err != nil {
		return err
	}
	r.rows = append(r.rows, add0, rm0, add1, rm1)
	if a0, a1 := add0.s[p.slot], add1.s[p.slot]; len(a0) > 0 && len(a1) > 0 {
		r.notef("sharing check scaling (xenblkd, pre-setup off): file add median %s ms with the host's loop devices, %s ms with %d more bound and %d more unbound: %.2f× (target ≤ 1.1×)",
			ms2(a0.median()), ms2(a1.median()), otherLoops, otherLoops, float64(a1.median())/float64(a0.median()))
	}
	return nil
}

// otherLoopSet is the loop devices loopScaling made: the fds of the bound
// ones, and every index it added.
type otherLoopSet struct {
	fds   []int
	added []int
}

func bindOtherLoops(dir string) (*otherLoopSet, error) {
	s := &otherLoopSet{}
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return s, err
	}
	defer unix.Close(ctl)
	add := func(index int) error {
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(ctl), unix.LOOP_CTL_ADD, uintptr(index)); errno != 0 {
			return fmt.Errorf("LOOP_CTL_ADD %d: %w", index, errno)
		}
		s.added = append(s.added, index)
		return nil
	}
	for i := range otherLoops {
		index := otherBoundBase + i
		if err := add(index); err != nil {
			return s, err
		}
		path := fmt.Sprintf("%s/other-loop-%d.img", dir, i)
		if err := sparseFile(path, 1<<20); err != nil {
			return s, err
		}
		backing, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return s, err
		}
		fd, err := unix.Open(fmt.Sprintf("/dev/loop%d", index), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			unix.Close(backing)
			return s, err
		}
		config := unix.LoopConfig{Fd: uint32(backing), Size: 512}
		config.Info.Flags = unix.LO_FLAGS_AUTOCLEAR | unix.LO_FLAGS_READ_ONLY
		copy(config.Info.File_name[:], "xenblkd-bench:other")
		err = unix.IoctlLoopConfigure(fd, &config)
		unix.Close(backing)
		if err != nil {
			unix.Close(fd)
			return s, fmt.Errorf("LOOP_CONFIGURE loop%d: %w", index, err)
		}
		s.fds = append(s.fds, fd)
	}
	for i := range otherLoops {
		if err := add(otherUnboundBase + i); err != nil {
			return s, err
		}
	}
	return s, nil
}

// free closes the bound devices' fds (AUTOCLEAR clears them), then removes
// every node it added, in parallel (LOOP_CTL_REMOVE waits for del_gendisk,
// tens of ms each), retrying while a device is still busy.
func (s *otherLoopSet) free(r *report) {
	for _, fd := range s.fds {
		unix.Close(fd)
	}
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		r.notef("cannot free loop devices %d..%d: %v", otherBoundBase, otherUnboundBase+otherLoops-1, err)
		return
	}
	defer unix.Close(ctl)
	work := make(chan int)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for index := range work {
				for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(time.Millisecond) {
					_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(ctl), unix.LOOP_CTL_REMOVE, uintptr(index))
					if errno == 0 || errno == unix.ENODEV {
						break
					}
					if !errors.Is(errno, unix.EBUSY) || time.Now().After(deadline) {
						fmt.Fprintf(os.Stderr, "bench: remove loop%d: %v\n", index, errno)
						break
					}
				}
			}
		})
	}
	for _, index := range s.added {
		work <- index
	}
	close(work)
	wg.Wait()
}
