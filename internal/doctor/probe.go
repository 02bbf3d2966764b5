package doctor

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// LoopProbe is what probing the loop API found.
type LoopProbe struct {
	Device     string // the probe's /dev/loopN, once bound
	Err        error  // binding with LOOP_CONFIGURE failed
	DiskSeq    uint64
	DiskSeqErr error // BLKGETDISKSEQ failed (kernel < 5.15)
}

// probeTag marks the probe device; it does not start with "xenblkd:" so the
// stale-loops check never reports a probe that is being released.
const probeTag = "xenblkd-doctor:probe"

// probeLoop binds a free loop device to a 4 KiB temporary file with one
// LOOP_CONFIGURE (read-only, AUTOCLEAR), reads its diskseq and closes it, which
// frees it. It uses raw ioctls rather than internal/loop so that doctor can
// diagnose a host even where that package refuses to run.
func probeLoop(o *Options) LoopProbe {
	backing, err := os.CreateTemp(o.TempDir, "xenblkd-doctor-*")
	if err != nil {
		return LoopProbe{Err: fmt.Errorf("create probe backing file: %w", err)}
	}
	defer os.Remove(backing.Name())
	defer backing.Close()
	if err := backing.Truncate(4096); err != nil {
		return LoopProbe{Err: fmt.Errorf("size probe backing file: %w", err)}
	}
	ro, err := os.Open(backing.Name())
	if err != nil {
		return LoopProbe{Err: fmt.Errorf("open probe backing file: %w", err)}
	}
	defer ro.Close()

	ctl, err := unix.Open(o.LoopControl, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return LoopProbe{Err: fmt.Errorf("open %s: %w", o.LoopControl, err)}
	}
	defer unix.Close(ctl)

	var cfg unix.LoopConfig
	cfg.Fd = uint32(ro.Fd())
	cfg.Info.Flags = unix.LO_FLAGS_READ_ONLY | unix.LO_FLAGS_AUTOCLEAR
	copy(cfg.Info.File_name[:], probeTag)

	// Another process may take the free device between LOOP_CTL_GET_FREE and
	// LOOP_CONFIGURE (EBUSY): ask again, a few times.
	var lastErr error
	for range 8 {
		n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return LoopProbe{Err: fmt.Errorf("LOOP_CTL_GET_FREE: %w", err)}
		}
		dev := filepath.Join(o.DevDir, fmt.Sprintf("loop%d", n))
		fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return LoopProbe{Err: fmt.Errorf("open %s: %w", dev, err)}
		}
		err = unix.IoctlLoopConfigure(fd, &cfg)
		if errors.Is(err, unix.EBUSY) {
			unix.Close(fd)
			lastErr = fmt.Errorf("LOOP_CONFIGURE %s: %w", dev, err)
			continue
		}
		if err != nil {
			unix.Close(fd)
			return LoopProbe{Err: fmt.Errorf("LOOP_CONFIGURE %s: %w", dev, err)}
		}
		// Closing our only fd frees the device (AUTOCLEAR).
		defer unix.Close(fd)
		p := LoopProbe{Device: dev}
		p.DiskSeq, p.DiskSeqErr = unix.IoctlGetUint64(fd, unix.BLKGETDISKSEQ)
		if p.DiskSeqErr == nil && p.DiskSeq == 0 {
			p.DiskSeqErr = errors.New("BLKGETDISKSEQ returned 0")
		}
		return p
	}
	return LoopProbe{Err: lastErr}
}

// loopTag returns the lo_file_name of the loop device at devPath. It opens the
// device read-only without O_EXCL; the daemon or blkback holds every device
// that is in use, so this close is never the one that AUTOCLEARs it.
func loopTag(devPath string) (string, error) {
	fd, err := unix.Open(devPath, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(fd)
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		return "", fmt.Errorf("LOOP_GET_STATUS64 %s: %w", devPath, err)
	}
	return unix.ByteSliceToString(info.File_name[:]), nil
}
