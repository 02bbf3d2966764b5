// Command fdsvc is the test service of xenblkd/test/systemd's fd store test.
// Run as a Type=notify unit: on its first start it attaches a loop device
// (LOOP_CONFIGURE + AUTOCLEAR, tag "xenblkd-test:fdsvc") to the image given
// as its first argument and pushes the device's fd into systemd's fd store
// under fdstore.LoopName; on later starts it receives the fd back and
// verifies it against its name (device number, diskseq, tag). SIGUSR1 makes
// it remove the fd from the store and close its own copy.
//
//	fdsvc <image> <events-log>
//
// Each event is one line "pid=<pid> event=<attached|received|removed|error> name=<name> ..."
// appended to events-log.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"xenblkd/internal/fdstore"
)

const tag = "xenblkd-test:fdsvc"

var eventsLog string

func event(format string, args ...any) {
	f, err := os.OpenFile(eventsLog, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer f.Close()
	fmt.Fprintf(f, "pid=%d "+format+"\n", append([]any{os.Getpid()}, args...)...)
}

func fail(format string, args ...any) {
	event("event=error msg=%q", fmt.Sprintf(format, args...))
	os.Exit(1)
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: fdsvc <image> <events-log>")
		os.Exit(2)
	}
	eventsLog = os.Args[2]

	files, err := fdstore.Listen()
	if err != nil {
		fail("listen: %v", err)
	}
	// The API socket of xenblkd.socket comes in the same LISTEN_FDS, by name,
	// as the daemon takes it (socket activation): not a loop device.
	sockets, files := fdstore.Take(files, "api")
	for _, s := range sockets {
		event("event=socket name=%s fd=%d", s.Name, s.Fd)
	}
	held := map[string]int{} // name -> fd
	for _, f := range files {
		if err := verify(f); err != nil {
			fail("verify %s: %v", f.Name, err)
		}
		held[f.Name] = f.Fd
		event("event=received name=%s fd=%d", f.Name, f.Fd)
	}
	if len(held) == 0 {
		name, fd, err := attach(os.Args[1])
		if err != nil {
			fail("attach: %v", err)
		}
		if err := fdstore.Store(name, fd); err != nil {
			fail("store: %v", err)
		}
		held[name] = fd
		event("event=attached name=%s fd=%d", name, fd)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1)
	if err := fdstore.Notify(fmt.Sprintf("READY=1\nSTATUS=holding %d loop devices", len(held))); err != nil {
		fail("notify: %v", err)
	}
	for range sig {
		for name, fd := range held {
			if err := fdstore.Remove(name); err != nil {
				fail("remove: %v", err)
			}
			unix.Close(fd)
			delete(held, name)
			event("event=removed name=%s", name)
		}
		fdstore.Notify("STATUS=holding 0 loop devices")
	}
}

// attach binds a free loop device to image with AUTOCLEAR and returns its fd.
func attach(image string) (name string, loopFD int, err error) {
	backing, err := unix.Open(image, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", -1, err
	}
	defer unix.Close(backing)
	ctl, err := unix.Open("/dev/loop-control", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", -1, err
	}
	defer unix.Close(ctl)
	if err := unix.Flock(ctl, unix.LOCK_EX); err != nil {
		return "", -1, err
	}
	for range 64 {
		n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", -1, fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)
		}
		fd, err := unix.Open(fmt.Sprintf("/dev/loop%d", n), unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return "", -1, err
		}
		cfg := unix.LoopConfig{Fd: uint32(backing)}
		cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
		copy(cfg.Info.File_name[:], tag)
		if err := unix.IoctlLoopConfigure(fd, &cfg); err != nil {
			unix.Close(fd)
			if err == unix.EBUSY {
				continue // another process (not under our lock) won the race
			}
			return "", -1, fmt.Errorf("LOOP_CONFIGURE /dev/loop%d: %w", n, err)
		}
		seq, err := unix.IoctlGetUint64(fd, unix.BLKGETDISKSEQ)
		if err != nil {
			unix.Close(fd)
			return "", -1, err
		}
		return fdstore.LoopName(n, seq), fd, nil
	}
	return "", -1, fmt.Errorf("no free loop device after 64 tries")
}

// verify checks that a returned fd is the binding its name says.
func verify(f fdstore.File) error {
	n, seq, err := fdstore.ParseLoopName(f.Name)
	if err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Fstat(f.Fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(st.Rdev) != 7 || unix.Minor(st.Rdev) != uint32(n) {
		return fmt.Errorf("fd is %d:%d, want 7:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev), n)
	}
	got, err := unix.IoctlGetUint64(f.Fd, unix.BLKGETDISKSEQ)
	if err != nil {
		return err
	}
	if got != seq {
		return fmt.Errorf("diskseq %d, want %d", got, seq)
	}
	info, err := unix.IoctlLoopGetStatus64(f.Fd)
	if err != nil {
		return fmt.Errorf("LOOP_GET_STATUS64 (unbound?): %w", err)
	}
	if ref := strings.TrimRight(string(info.File_name[:]), "\x00"); ref != tag {
		return fmt.Errorf("tag %q, want %q", ref, tag)
	}
	return nil
}
