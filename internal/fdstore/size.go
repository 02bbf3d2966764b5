package fdstore

import (
	"log/slog"
	"os"
	"strconv"
	"sync"
)

// systemd ≥ 254 announces the store's size (FileDescriptorStoreMax=) in
// $FDSTORE; 252 does not. Beyond it systemd refuses fds without telling the
// sender (it only logs), and a device it refused is not kept across a crash
// of the daemon. So the package counts what it stored and warns before that.

// usage counts the fds in the store: those pushed by Store, plus those the
// service manager passed back (Listen), minus those removed.
type usage struct {
	mu    sync.Mutex
	held  map[string]int // fds stored under each name
	total int
}

var stored = usage{held: map[string]int{}}

// storeSize is the store's size from $FDSTORE, or 0 where systemd does not
// say it (252, no systemd).
func storeSize() int {
	n, err := strconv.Atoi(os.Getenv("FDSTORE"))
	if err != nil || n <= 0 {
		return 0
	}
	return n
}

// set records that n fds are now stored under name (0: none) and warns when
// the total crosses 90 % of the store's size, or the size itself.
func (u *usage) set(name string, n int) {
	u.mu.Lock()
	before := u.total
	u.total += n - u.held[name]
	if n == 0 {
		delete(u.held, name)
	} else {
		u.held[name] = n
	}
	after := u.total
	u.mu.Unlock()
	if msg := sizeWarning(before, after, storeSize()); msg != "" {
		slog.Warn(msg, "fds", after, "fdstore_size", storeSize(), "fd", name)
	}
}

// sizeWarning says what to warn about when the store's count goes from
// before to after, with size its size (0: unknown). It warns on the way up
// only, once per crossing, so a host at its limit is not flooded.
func sizeWarning(before, after, size int) string {
	if size <= 0 || after <= before {
		return ""
	}
	if before <= size && after > size {
		return "systemd fd store full: systemd refuses the fds beyond its size (FileDescriptorStoreMax=), and a restart or crash of the daemon frees the loop devices among them no VM holds open; raise FileDescriptorStoreMax= in a drop-in (systemctl edit xenblkd)"
	}
	near := size - size/10 // 90 %, rounded up
	if before < near && after >= near {
		return "systemd fd store nearly full (90 % of FileDescriptorStoreMax=): beyond it, loop devices no VM holds open do not survive a restart or crash of the daemon; raise FileDescriptorStoreMax= in a drop-in (systemctl edit xenblkd)"
	}
	return ""
}

// count is the number of fds stored under name.
func (u *usage) count(name string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.held[name]
}
