// Package loop drives the Linux loop-device API safely: one LOOP_CONFIGURE
// with AUTOCLEAR, a held fd, diskseq-checked identity. It knows nothing of
// Xen or of policy.
//
// CONTRACT SKELETON: the exported API below is what the rest of xenblkd codes
// against. Implementations may add to it but must keep these signatures.
package loop

import (
	"errors"
	"os"
)

// Options says how Attach configures a loop device.
type Options struct {
	ReadOnly  bool   // LO_FLAGS_READ_ONLY; the backing file may be opened O_RDONLY
	DirectIO  bool   // LO_FLAGS_DIRECT_IO (off by default)
	BlockSize uint32 // logical block size; 0 means 512
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
	Rdev    uint64 // unix.Mkdev(7, N) (major may differ with large minors)
	DiskSeq uint64
	Backing FileID
	Flags   uint32 // lo_flags
	Tag     string // lo_file_name
}

// Device is a loop device bound by (or adopted into) this process. It owns an
// open fd (a raw int, never an *os.File, so no finalizer can autoclear it).
type Device struct {
	fd      int
	binding Binding
}

// ErrDiskSeqMismatch: the device's diskseq is not the one expected, i.e. it was
// cleared and possibly re-bound to something else since it was recorded.
var ErrDiskSeqMismatch = errors.New("diskseq mismatch: loop device was reused")

// ErrNotBound: the device exists but is not bound to a backing file.
var ErrNotBound = errors.New("loop device not bound")

// Attach binds a new loop device to backing (see the package doc for the steps).
func Attach(backing *os.File, opts Options) (*Device, error) { panic("TODO") }

// Open re-acquires loop device number if its diskseq is still wantDiskSeq.
func Open(number int, wantDiskSeq uint64) (*Device, error) { panic("TODO") }

// Adopt takes ownership of fd (e.g. returned by systemd's fd store) after checking
// it is a bound loop device; on error fd is left open for the caller.
func Adopt(fd int) (*Device, error) { panic("TODO") }

// FindByBacking lists every bound loop device whose backing file is id.
func FindByBacking(id FileID) ([]Binding, error) { panic("TODO") }

// List lists every bound loop device in the system.
func List() ([]Binding, error) { panic("TODO") }

func (d *Device) Path() string     { return d.binding.Path }
func (d *Device) Number() int      { return d.binding.Number }
func (d *Device) Rdev() uint64     { return d.binding.Rdev }
func (d *Device) DiskSeq() uint64  { return d.binding.DiskSeq }
func (d *Device) Backing() FileID  { return d.binding.Backing }
func (d *Device) Flags() uint32    { return d.binding.Flags }
func (d *Device) Tag() string      { return d.binding.Tag }
func (d *Device) Binding() Binding { return d.binding }
func (d *Device) ReadOnly() bool   { return d.binding.Flags&1 != 0 }
func (d *Device) Fd() int          { return d.fd }

// Verify re-reads the device's state and fails unless it is still bound to the
// same backing file with the same diskseq.
func (d *Device) Verify() error { panic("TODO") }

// Close releases this process's fd; with AUTOCLEAR the kernel frees the device
// once the last opener (e.g. xen-blkback) lets go.
func (d *Device) Close() error { panic("TODO") }
