package loop

import (
	"os"
	"sync"
)

// Major is LOOP_MAJOR (include/uapi/linux/major.h). Whole loop devices
// always use it: the minor space (20 bits) covers every index loop_add can
// hand out; only partitions spill over to BLOCK_EXT_MAJOR, and they are not
// loop devices.
const Major = 7

// Options says how Attach configures a loop device.
type Options struct {
	ReadOnly bool // LO_FLAGS_READ_ONLY; the backing file may be opened O_RDONLY
	// DirectIO asks for LO_FLAGS_DIRECT_IO. The kernel may silently refuse
	// it (see the package doc); Device.DirectIO says what is in effect.
	DirectIO  bool
	BlockSize uint32 // logical block size; 0 means 512 (never the kernel's own choice)
	Tag       string // stored in lo_file_name (at most 63 bytes) to mark the device as ours
}

// FileID identifies a backing file: st_dev and st_ino as the kernel reports them
// (LOOP_GET_STATUS64 lo_device/lo_inode == fstat Dev/Ino).
type FileID struct {
	Dev uint64
	Ino uint64
}

// Binding describes a bound loop device as seen from sysfs + LOOP_GET_STATUS64,
// whoever configured it.
type Binding struct {
	Number  int
	Path    string // /dev/loopN
	Rdev    uint64 // unix.Mkdev(Major, N)
	DiskSeq uint64 // 0 on kernels without BLKGETDISKSEQ (< 5.15)
	Backing FileID
	Flags   uint32 // lo_flags
	Tag     string // lo_file_name
}

// Device is a loop device bound by (or adopted into) this process. It owns an
// open fd (a raw int, never an *os.File, so no finalizer can autoclear it).
// Its methods are safe for concurrent use.
type Device struct {
	mu      sync.RWMutex // guards fd: Close takes it exclusively, users of fd shared
	fd      int          // -1 once closed
	binding Binding      // set at construction, never changed
	io      ioMode       // set at construction, never changed
}

// ioMode is how the device reads and writes its backing file, as read back
// from the kernel once the device is configured.
type ioMode struct {
	directIO  bool   // /sys/block/loopN/loop/dio is 1 (and lo_flags agree)
	blockSize uint32 // the logical block size it presents (BLKSSZGET)
}

// Attach binds a new loop device to backing (see the package doc for the
// steps). backing may be closed once Attach returns: the kernel keeps its own
// reference to the file.
func Attach(backing *os.File, opts Options) (*Device, error) {
	return attach(backing, opts, false)
}

// OpenBacking opens path as a loop backing file: read-only or read-write as
// asked, O_CLOEXEC, without blocking on a FIFO. It refuses anything Attach
// would refuse (a directory, FIFO, character device, socket, empty file) with
// an *OpError wrapping one of the Err* sentinels or the open's errno (e.g.
// fs.ErrNotExist).
func OpenBacking(path string, readOnly bool) (*os.File, error) {
	return openBacking(path, readOnly)
}

// Open re-acquires loop device number if its diskseq is still wantDiskSeq.
// A different diskseq is ErrDiskSeqMismatch (the device was cleared and maybe
// reused); an unbound device with the same diskseq is ErrNotBound. The fd is
// opened O_RDONLY: it only pins the binding. Needs BLKGETDISKSEQ (Linux 5.15).
func Open(number int, wantDiskSeq uint64) (*Device, error) {
	return open(number, wantDiskSeq)
}

// Adopt takes ownership of fd (e.g. returned by systemd's fd store) after checking
// it is a bound loop device; on error fd is left open for the caller.
func Adopt(fd int) (*Device, error) {
	return adopt(fd)
}

// FindByBacking lists every bound loop device whose backing file is id,
// leaving out the devices skip (if not nil) reports true for. skip gets each
// bound device's path (/dev/loopN, from the sysfs name) before the device is
// opened, so skipped devices cost no open or ioctl: a daemon passes the
// devices it holds, whose bindings it knows. Every other device is checked
// by LOOP_GET_STATUS64. Index.FindByBacking answers the same question
// without a scan.
func FindByBacking(id FileID, skip func(path string) bool) ([]Binding, error) {
	all, err := listSkipping(skip)
	if err != nil {
		return nil, err
	}
	var found []Binding
	for _, b := range all {
		if b.Backing == id {
			found = append(found, b)
		}
	}
	return found, nil
}

func (d *Device) Path() string     { return d.binding.Path }
func (d *Device) Number() int      { return d.binding.Number }
func (d *Device) Rdev() uint64     { return d.binding.Rdev }
func (d *Device) DiskSeq() uint64  { return d.binding.DiskSeq }
func (d *Device) Backing() FileID  { return d.binding.Backing }
func (d *Device) Flags() uint32    { return d.binding.Flags }
func (d *Device) Tag() string      { return d.binding.Tag }
func (d *Device) Binding() Binding { return d.binding }
func (d *Device) ReadOnly() bool   { return d.binding.Flags&1 != 0 }

// DirectIO reports whether the device does direct I/O to its backing file
// (no dom0 page cache), as verified after configuring.
func (d *Device) DirectIO() bool { return d.io.directIO }

// BlockSize is the logical block size the device presents, i.e. the sector
// size a guest sees through xen-blkback.
func (d *Device) BlockSize() uint32 { return d.io.blockSize }

// Fd returns the device's open fd, or -1 after Close. The Device still owns
// it: dup it to keep it beyond Close (e.g. to hand it to systemd's fd store).
func (d *Device) Fd() int {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.fd
}

// Verify re-reads the device's state and fails unless it is still bound to the
// same backing file with the same diskseq (and still AUTOCLEAR, if it was).
func (d *Device) Verify() error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.fd < 0 {
		return &OpError{Op: "verify", Dev: d.binding.Path, Err: os.ErrClosed}
	}
	return verify(d.fd, d.binding)
}

// Close releases this process's fd; with AUTOCLEAR the kernel frees the device
// once the last opener (e.g. xen-blkback) lets go. It never calls LOOP_CLR_FD.
// Close is idempotent: later calls return nil.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.fd < 0 {
		return nil
	}
	fd := d.fd
	d.fd = -1
	if err := closeFd(fd); err != nil {
		return &OpError{Op: "close", Dev: d.binding.Path, Err: err}
	}
	return nil
}
