package loop

import (
	"bytes"
	"errors"
	"os"
	"slices"
	"strconv"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Index is the host's bound loop devices by backing file, kept current from
// the kernel's block uevents (NETLINK_KOBJECT_UEVENT), so that finding the
// devices bound to a file costs the same with 0 or 2,000 loop devices on the
// host, where FindByBacking opens every bound one.
//
// A uevent is only a hint that loopN changed: the next lookup reads loopN's
// binding from the device itself (LOOP_GET_STATUS64), once however many
// events named it, so a forged, repeated or reordered event costs at most one
// read and cannot hide a device. Devices are opened only by lookups, never as
// events come (see drainLocked). What the
// kernel sends, verified on Linux 6.18 (and, for the configure, on 6.1: the
// testbed's Debian dom0, where the daemon saw the uevent of its own bind):
//
//   - LOOP_CONFIGURE and LOOP_SET_FD (both loop_configure): one "change"
//     carrying the new DISKSEQ, sent before the ioctl returns;
//   - LOOP_CHANGE_FD: one "change" (DISKSEQ bumped);
//   - LOOP_CLR_FD, and AUTOCLEAR on the last close (both __loop_clr_fd): a
//     "change", then a "change" with DISK_MEDIA_CHANGE=1;
//   - LOOP_CTL_ADD (and GET_FREE creating a device): "add"; LOOP_CTL_REMOVE:
//     "remove".
//
// The kernel queues a uevent on every listening socket before the call that
// caused it returns (netlink_broadcast is synchronous), so draining the
// socket at the start of a lookup makes the lookup see every bind that
// completed before it: the same guarantee as a scan. Older kernels
// suppressed uevents while configuring (5.9's loop_configure), so the index
// answers from memory only once it has seen the event of a bind this process
// made (SawAttach; never on kernels without DISKSEQ, < 5.15); until then,
// when the socket failed, and after Close, FindByBacking scans every device.
// An overflow (ENOBUFS: events were dropped) costs one rescan.
type Index struct {
	sock *os.File // the uevent socket, non-blocking, on the runtime poller
	raw  syscall.RawConn
	done chan struct{} // closed when the reader goroutine has returned

	mu      sync.Mutex                  // guards everything below, and the socket's reads
	bound   map[int]Binding             // by device number
	byFile  map[FileID]map[int]struct{} // device numbers by backing file
	lastSeq map[int]uint64              // DISKSEQ of the last uevent of each device
	trusted bool                        // the event of a bind of ours was seen
	rescan  bool                        // events were lost: rescan before answering
	failed  error                       // the socket failed or was closed: scan
	buf     []byte                      // one uevent (the kernel's UEVENT_BUFFER_SIZE is 2 KiB)
	dirty   map[int]struct{}            // devices named by events since they were last read
	rescans int                         // full scans since start, for tests and logs
}

// indexRcvBuf is the uevent socket's receive buffer: room for thousands of
// events (a few hundred bytes each, ~1 KiB of kernel memory) between two
// reads.
const indexRcvBuf = 4 << 20

// NewIndex opens the uevent socket, then scans every loop device (in that
// order, so no change between the two is missed) and keeps the index current
// until Close. The large receive buffer needs CAP_NET_ADMIN (SO_RCVBUFFORCE);
// without it the buffer is capped by net.core.rmem_max (a few hundred
// events), and an overflow costs one rescan.
func NewIndex() (*Index, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_KOBJECT_UEVENT)
	if err != nil {
		return nil, &OpError{Op: "index: open uevent socket", Err: err}
	}
	// Group 1 is the kernel's own events (udev re-broadcasts on group 2).
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: 1}); err != nil {
		unix.Close(fd)
		return nil, &OpError{Op: "index: bind uevent socket", Err: err}
	}
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, indexRcvBuf) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, indexRcvBuf)
	}
	sock := os.NewFile(uintptr(fd), "uevent")
	raw, err := sock.SyscallConn()
	if err != nil {
		sock.Close()
		return nil, &OpError{Op: "index: uevent socket", Err: err}
	}
	ix := &Index{sock: sock, raw: raw, done: make(chan struct{}), buf: make([]byte, 8<<10)}
	if err := ix.scanLocked(); err != nil {
		sock.Close()
		return nil, err
	}
	go ix.read()
	return ix, nil
}

// read drains events as they come, so the socket does not overflow while
// nobody looks things up. It returns when the socket is closed.
func (ix *Index) read() {
	defer close(ix.done)
	err := ix.raw.Read(func(fd uintptr) bool {
		ix.mu.Lock()
		defer ix.mu.Unlock()
		ix.drainLocked(int(fd))
		return ix.failed != nil // false: wait until readable again
	})
	ix.mu.Lock()
	if ix.failed == nil {
		ix.failed = &OpError{Op: "index: read uevents", Err: err}
	}
	ix.mu.Unlock()
}

// Close stops the index; FindByBacking then scans.
func (ix *Index) Close() error {
	ix.mu.Lock()
	if ix.failed == nil {
		ix.failed = &OpError{Op: "index", Err: os.ErrClosed}
	}
	ix.mu.Unlock()
	err := ix.sock.Close()
	<-ix.done
	return err
}

// FindByBacking lists every bound loop device whose backing file is id,
// leaving out those skip reports true for (skip may be nil). Each device the
// index names is read again through the device before it is returned.
func (ix *Index) FindByBacking(id FileID, skip func(path string) bool) ([]Binding, error) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.failed == nil {
		if err := ix.raw.Control(func(fd uintptr) { ix.drainLocked(int(fd)) }); err != nil && ix.failed == nil {
			ix.failed = &OpError{Op: "index: read uevents", Err: err}
		}
	}
	if ix.failed != nil || !ix.trusted {
		return FindByBacking(id, skip)
	}
	if err := ix.catchUpLocked(); err != nil {
		return nil, err
	}
	var found []Binding
	for n := range ix.byFile[id] {
		path := devPath(n)
		if skip != nil && skip(path) {
			continue
		}
		b, bound, err := ix.refreshLocked(n)
		if err != nil {
			return nil, err
		}
		if bound && b.Backing == id {
			found = append(found, b)
		}
	}
	slices.SortFunc(found, func(a, b Binding) int { return a.Number - b.Number })
	return found, nil
}

// SawAttach tells the index that this process just bound d, and reports
// whether the index has seen the kernel's uevent for that bind. The first
// time it has, the index starts answering FindByBacking from memory. It
// returns false when events were lost meanwhile (it may be asked again after
// the next bind) and when this kernel sends no uevent for a bind (then the
// index keeps scanning).
func (ix *Index) SawAttach(d *Device) bool {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.failed == nil {
		ix.raw.Control(func(fd uintptr) { ix.drainLocked(int(fd)) })
	}
	if ix.failed != nil {
		return false
	}
	if ix.lastSeq[d.Number()] == d.DiskSeq() && d.DiskSeq() != 0 {
		ix.trusted = true
	}
	return ix.trusted
}

// Rescans reports how many full scans the index has made (the first at
// NewIndex, then one per overflow).
func (ix *Index) Rescans() int {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	return ix.rescans
}

// drainLocked reads every queued event and notes the loop devices they name;
// it opens no device. (Reading devices here, as events come, would make this
// process a brief opener of every device that changes on the host, and a
// device released meanwhile by its owner would stay bound, AUTOCLEAR
// deferred, until that open ends.) ENOBUFS (events were dropped) means a
// rescan.
func (ix *Index) drainLocked(fd int) {
	for {
		n, from, err := unix.Recvfrom(fd, ix.buf, unix.MSG_DONTWAIT)
		if err == unix.EINTR {
			continue
		}
		if err == unix.ENOBUFS {
			ix.rescan = true
			continue
		}
		if err != nil {
			if err != unix.EAGAIN {
				ix.failed = &OpError{Op: "index: read uevents", Err: err}
			}
			return
		}
		if nl, ok := from.(*unix.SockaddrNetlink); !ok || nl.Pid != 0 {
			continue // not from the kernel
		}
		if number, seq, ok := parseLoopUevent(ix.buf[:n]); ok {
			ix.dirty[number] = struct{}{}
			ix.lastSeq[number] = seq
		}
	}
}

// catchUpLocked reads again each device an event named since it was last
// read (once, however many events), or every device after an overflow.
func (ix *Index) catchUpLocked() error {
	if !ix.rescan {
		for n := range ix.dirty {
			if _, _, err := ix.refreshLocked(n); err != nil {
				ix.rescan = true // unexpected (e.g. EACCES): start from scratch
				break
			}
			delete(ix.dirty, n)
		}
	}
	if ix.rescan {
		return ix.scanLocked()
	}
	return nil
}

// refreshLocked reads loopN's binding and records it (or its absence).
func (ix *Index) refreshLocked(n int) (Binding, bool, error) {
	b, err := inspect(n)
	// Cleared, in rundown or removed: not bound (as in List).
	if errors.Is(err, ErrNotBound) || errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENOENT) {
		ix.forgetLocked(n)
		return Binding{}, false, nil
	}
	if err != nil {
		return Binding{}, false, err
	}
	ix.forgetLocked(n)
	ix.bound[n] = b
	if ix.byFile[b.Backing] == nil {
		ix.byFile[b.Backing] = map[int]struct{}{}
	}
	ix.byFile[b.Backing][n] = struct{}{}
	return b, true, nil
}

func (ix *Index) forgetLocked(n int) {
	old, ok := ix.bound[n]
	if !ok {
		return
	}
	delete(ix.bound, n)
	delete(ix.byFile[old.Backing], n)
	if len(ix.byFile[old.Backing]) == 0 {
		delete(ix.byFile, old.Backing)
	}
}

// scanLocked rebuilds the index from every loop device (List).
func (ix *Index) scanLocked() error {
	all, err := list()
	if err != nil {
		return err
	}
	ix.bound, ix.byFile = map[int]Binding{}, map[FileID]map[int]struct{}{}
	if ix.lastSeq == nil {
		ix.lastSeq = map[int]uint64{}
	}
	for _, b := range all {
		ix.bound[b.Number] = b
		if ix.byFile[b.Backing] == nil {
			ix.byFile[b.Backing] = map[int]struct{}{}
		}
		ix.byFile[b.Backing][b.Number] = struct{}{}
	}
	ix.rescan, ix.dirty = false, map[int]struct{}{}
	ix.rescans++
	return nil
}

// parseLoopUevent returns the device number and DISKSEQ of a uevent about a
// whole loop device ("ACTION@DEVPATH\0KEY=VALUE\0..."); ok is false for
// anything else (partitions, other subsystems, malformed messages).
func parseLoopUevent(msg []byte) (number int, diskSeq uint64, ok bool) {
	fields := bytes.Split(msg, []byte{0})
	if len(fields) < 2 || !bytes.Contains(fields[0], []byte("@")) {
		return 0, 0, false // libudev's messages start "libudev\0"; not ours to read
	}
	var subsystem, devtype, devname, seq string
	for _, f := range fields[1:] {
		key, value, found := bytes.Cut(f, []byte("="))
		if !found {
			continue
		}
		switch string(key) {
		case "SUBSYSTEM":
			subsystem = string(value)
		case "DEVTYPE":
			devtype = string(value)
		case "DEVNAME":
			devname = string(value)
		case "DISKSEQ":
			seq = string(value)
		}
	}
	if subsystem != "block" || devtype != "disk" {
		return 0, 0, false
	}
	digits, found := bytes.CutPrefix([]byte(devname), []byte("loop"))
	if !found || len(digits) == 0 || len(digits) > 7 {
		return 0, 0, false
	}
	for _, c := range digits {
		if c < '0' || c > '9' {
			return 0, 0, false
		}
	}
	number, _ = strconv.Atoi(string(digits))
	diskSeq, _ = strconv.ParseUint(seq, 10, 64) // 0 if absent (kernel < 5.15)
	return number, diskSeq, true
}
