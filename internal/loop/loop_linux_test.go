package loop_test

// Integration tests against the real kernel: they need root and create loop
// devices. On a shared machine they touch only devices they created: held by
// their own fd, or bound to their own files in t.TempDir(). Every device
// carries a tag "xenblkd-test:<pid>:<test>" and the tests count only those.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/loop"
	"xenblkd/internal/testenv"
	"xenblkd/test/looptest"
)

// holdEnv makes the test binary a "second opener" child: it opens the loop
// device named by "<number>:<diskseq>", prints "held", holds it until stdin
// reaches EOF, and exits. It stands in for xen-blkback.
const holdEnv = "XENBLKD_LOOP_TEST_HOLD"

func TestMain(m *testing.M) {
	if spec := os.Getenv(holdEnv); spec != "" {
		os.Exit(holdDevice(spec))
	}
	testenv.Main(m)
}

func holdDevice(spec string) int {
	var number int
	var seq uint64
	if _, err := fmt.Sscanf(spec, "%d:%d", &number, &seq); err != nil {
		fmt.Fprintln(os.Stderr, "bad spec:", err)
		return 2
	}
	d, err := loop.Open(number, seq)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("held")
	_, _ = bufio.NewReader(os.Stdin).ReadString(0) // until EOF
	if err := d.Close(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// waitLimit bounds waits for the kernel to clear a device. It is no
// performance assertion: udev (on a real dom0) may hold a device briefly
// after our last close and delay the clear.
const waitLimit = 20 * time.Second

var tagCounter atomic.Int64

func requireRoot(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t, "creates loop devices")
}

// testTag returns a tag unique to this test run.
func testTag(t testing.TB) string {
	tag := fmt.Sprintf("xenblkd-test:%d:%d:%s", os.Getpid(), tagCounter.Add(1), t.Name())
	return tag[:min(len(tag), unix.LO_NAME_SIZE-1)]
}

// sparseFile creates a sparse file of size bytes in t.TempDir().
func sparseFile(t testing.TB, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return path
}

func openBacking(t testing.TB, path string, readOnly bool) *os.File {
	t.Helper()
	f, err := loop.OpenBacking(path, readOnly)
	if err != nil {
		t.Fatalf("OpenBacking(%s): %v", path, err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func backingID(t testing.TB, f *os.File) loop.FileID {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return loop.FileID{Dev: uint64(st.Dev), Ino: st.Ino}
}

// attach attaches path and closes the device at cleanup.
func attach(t testing.TB, path string, opts loop.Options) *loop.Device {
	t.Helper()
	if opts.Tag == "" {
		opts.Tag = testTag(t)
	}
	d, err := loop.Attach(openBacking(t, path, opts.ReadOnly), opts)
	if err != nil {
		t.Fatalf("Attach(%s): %v", path, err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// sysfsDiskSeq reads /sys/block/loopN/diskseq; ok is false if the device is gone.
func sysfsDiskSeq(t testing.TB, number int) (seq uint64, ok bool) {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/sys/block/loop%d/diskseq", number))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, false
	}
	if err != nil {
		t.Fatal(err)
	}
	seq, err = strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return seq, true
}

// waitCleared waits until the binding (number, seq) is gone: clearing bumps
// diskseq, so any other diskseq (or a removed device) means it was cleared.
func waitCleared(t testing.TB, number int, seq uint64) {
	t.Helper()
	for deadline := time.Now().Add(waitLimit); ; time.Sleep(time.Millisecond) {
		now, ok := sysfsDiskSeq(t, number)
		if !ok || now != seq {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("loop%d (diskseq %d) still bound after %v", number, seq, waitLimit)
		}
	}
}

// boundTo lists the loop devices whose backing file, as sysfs shows it, is
// path or below it. It opens no device: a test that opened every device of
// the host (loop.List) would be an opener of other tests' devices, and their
// release (AUTOCLEAR, losetup -d) would wait for it.
func boundTo(path string) []string {
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // cleared meanwhile
		}
		backing := strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
		if backing == path || strings.HasPrefix(backing, path+"/") {
			out = append(out, "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(f))))
		}
	}
	return out
}

// waitNoneBound waits until no loop device is bound to a file of this test
// (all made under its temporary directories).
func waitNoneBound(t testing.TB) {
	t.Helper()
	root := filepath.Dir(t.TempDir())
	for deadline := time.Now().Add(waitLimit); ; time.Sleep(time.Millisecond) {
		left := boundTo(root)
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("devices bound to files of this test under %s still bound after %v: %v", root, waitLimit, left)
		}
	}
}

func TestIntegrationAttachBinding(t *testing.T) {
	requireRoot(t)
	path := sparseFile(t, 1<<20)
	tests := []struct {
		name      string
		opts      loop.Options
		wantFlags uint32
	}{
		{"read-write", loop.Options{}, unix.LO_FLAGS_AUTOCLEAR},
		{"read-only", loop.Options{ReadOnly: true}, unix.LO_FLAGS_AUTOCLEAR | unix.LO_FLAGS_READ_ONLY},
		{"block size 4096", loop.Options{BlockSize: 4096}, unix.LO_FLAGS_AUTOCLEAR},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.Tag = testTag(t)
			backing := openBacking(t, path, tt.opts.ReadOnly)
			d, err := loop.Attach(backing, tt.opts)
			if err != nil {
				t.Fatalf("Attach: %v", err)
			}
			t.Cleanup(func() { d.Close() })

			if got, want := d.Backing(), backingID(t, backing); got != want {
				t.Errorf("Backing() = %v, want %v", got, want)
			}
			if got := d.Flags() &^ unix.LO_FLAGS_DIRECT_IO; got != tt.wantFlags {
				t.Errorf("Flags() = %#x, want %#x", got, tt.wantFlags)
			}
			if got, want := d.Path(), fmt.Sprintf("/dev/loop%d", d.Number()); got != want {
				t.Errorf("Path() = %q, want %q", got, want)
			}
			if got, want := d.Rdev(), unix.Mkdev(7, uint32(d.Number())); got != want {
				t.Errorf("Rdev() = %#x, want %#x", got, want)
			}
			if got := d.Tag(); got != tt.opts.Tag {
				t.Errorf("Tag() = %q, want %q", got, tt.opts.Tag)
			}
			if seq, _ := sysfsDiskSeq(t, d.Number()); d.DiskSeq() == 0 || d.DiskSeq() != seq {
				t.Errorf("DiskSeq() = %d, sysfs says %d", d.DiskSeq(), seq)
			}
			if got := d.ReadOnly(); got != tt.opts.ReadOnly {
				t.Errorf("ReadOnly() = %v, want %v", got, tt.opts.ReadOnly)
			}
			wantBS := max(tt.opts.BlockSize, 512)
			if got, err := unix.IoctlGetInt(d.Fd(), unix.BLKSSZGET); err != nil || uint32(got) != wantBS {
				t.Errorf("logical block size = %d (%v), want %d", got, err, wantBS)
			}
			if err := d.Verify(); err != nil {
				t.Errorf("Verify: %v", err)
			}
		})
	}
}

func TestIntegrationWriteThrough(t *testing.T) {
	requireRoot(t)
	path := sparseFile(t, 1<<20)
	d := attach(t, path, loop.Options{})
	file, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { file.Close() })

	// device → file: the device's page cache is flushed by fsync, the loop
	// worker writes into the file's page cache, which read() sees.
	want := bytes.Repeat([]byte("xenblkd-device→file "), 200)
	if _, err := unix.Pwrite(d.Fd(), want, 4096); err != nil {
		t.Fatalf("write through %s: %v", d.Path(), err)
	}
	if err := unix.Fsync(d.Fd()); err != nil {
		t.Fatalf("fsync %s: %v", d.Path(), err)
	}
	got := make([]byte, len(want))
	if _, err := file.ReadAt(got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("file at 4096 = %.40q..., want %.40q...", got, want)
	}

	// file → device: at an offset the device has never read, so its page
	// cache holds nothing stale.
	want = bytes.Repeat([]byte("xenblkd-file→device "), 200)
	if _, err := file.WriteAt(want, 65536); err != nil {
		t.Fatal(err)
	}
	got = make([]byte, len(want))
	if _, err := unix.Pread(d.Fd(), got, 65536); err != nil {
		t.Fatalf("read through %s: %v", d.Path(), err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("device at 65536 = %.40q..., want %.40q...", got, want)
	}
}

func TestIntegrationReadOnly(t *testing.T) {
	requireRoot(t)
	path := sparseFile(t, 1<<20)
	d := attach(t, path, loop.Options{ReadOnly: true})
	if !d.ReadOnly() {
		t.Fatalf("ReadOnly() = false, flags %#x", d.Flags())
	}

	// Through the held fd (opened O_RDONLY) ...
	if _, err := unix.Pwrite(d.Fd(), []byte("nope"), 0); err == nil {
		t.Errorf("write through held fd of %s succeeded", d.Path())
	}
	// ... and through a new writable open: the kernel marks the disk
	// read-only, so either the open or the write must fail.
	fd, err := unix.Open(d.Path(), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err == nil {
		t.Cleanup(func() { unix.Close(fd) })
		if _, err := unix.Pwrite(fd, []byte("nope"), 0); err == nil {
			t.Errorf("write through O_RDWR open of %s succeeded", d.Path())
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(data, []byte("nope")) {
		t.Error("backing file was written through a read-only device")
	}
}

// TestIntegrationEmptyReadOnly: a 0-byte file, mode 0400, as libxl 4.19+
// passes an empty CD-ROM drive, binds read-only as a 0-byte device (as the
// stock script's losetup does); read-write it stays refused (TestIntegrationBadInput).
func TestIntegrationEmptyReadOnly(t *testing.T) {
	requireRoot(t)
	path := filepath.Join(t.TempDir(), "empty-cdrom.7")
	if err := os.WriteFile(path, nil, 0o400); err != nil {
		t.Fatal(err)
	}
	d := attach(t, path, loop.Options{ReadOnly: true})
	if !d.ReadOnly() {
		t.Errorf("ReadOnly() = false, flags %#x", d.Flags())
	}
	if err := d.Verify(); err != nil {
		t.Errorf("Verify: %v", err)
	}
	size, err := unix.IoctlGetUint64(d.Fd(), unix.BLKGETSIZE64)
	if err != nil || size != 0 {
		t.Errorf("size of %s: %d, %v; want 0", d.Path(), size, err)
	}
	if got := d.Backing(); got != backingID(t, openBacking(t, path, true)) {
		t.Errorf("Backing() = %+v, want the placeholder's", got)
	}
}

func TestIntegrationAutoclear(t *testing.T) {
	requireRoot(t)
	path := sparseFile(t, 1<<20)
	backing := openBacking(t, path, false)
	d, err := loop.Attach(backing, loop.Options{Tag: testTag(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	number, seq := d.Number(), d.DiskSeq()

	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Errorf("second Close: %v, want nil", err)
	}
	if err := d.Verify(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Verify after Close: %v, want os.ErrClosed", err)
	}
	waitCleared(t, number, seq)

	// The old (number, diskseq) pair is dead for good, whoever has loopN now.
	if d2, err := loop.Open(number, seq); !errors.Is(err, loop.ErrDiskSeqMismatch) {
		if err == nil {
			d2.Close()
		}
		t.Errorf("Open(%d, %d) after clear: %v, want ErrDiskSeqMismatch", number, seq, err)
	}
	// Reattaching gets a larger diskseq (it is a global counter), even if
	// the kernel hands out the same loopN again.
	d3, err := loop.Attach(backing, loop.Options{Tag: testTag(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d3.Close() })
	if d3.DiskSeq() <= seq {
		t.Errorf("reattach: loop%d diskseq %d, want > %d (old loop%d)", d3.Number(), d3.DiskSeq(), seq, number)
	}
}

func TestIntegrationSecondOpener(t *testing.T) {
	requireRoot(t)
	d := attach(t, sparseFile(t, 1<<20), loop.Options{})
	number, seq := d.Number(), d.DiskSeq()

	child := exec.Command(os.Args[0], "-test.run=^$")
	// GORACE: under -race the child would otherwise sleep 1 s at exit.
	child.Env = append(os.Environ(), fmt.Sprintf("%s=%d:%d", holdEnv, number, seq), "GORACE=atexit_sleep_ms=0")
	child.Stderr = os.Stderr
	stdin, err := child.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	var waitOnce sync.Once
	var waitErr error
	wait := func() error { waitOnce.Do(func() { waitErr = child.Wait() }); return waitErr }
	t.Cleanup(func() {
		stdin.Close()
		child.Process.Kill() // by pid; no-op if it exited
		wait()
	})
	if line, err := bufio.NewReader(stdout).ReadString('\n'); line != "held\n" {
		t.Fatalf("child: %q, %v", line, err)
	}

	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	// The child is an opener: our close must not clear the device.
	if now, ok := sysfsDiskSeq(t, number); !ok || now != seq {
		t.Fatalf("loop%d after our Close while child holds it: diskseq %d (exists %v), want %d", number, now, ok, seq)
	}
	if _, err := os.Stat(fmt.Sprintf("/sys/block/loop%d/loop", number)); err != nil {
		t.Fatalf("loop%d unbound while child holds it: %v", number, err)
	}

	stdin.Close()
	if err := wait(); err != nil {
		t.Fatalf("child: %v", err)
	}
	waitCleared(t, number, seq)
}

func TestIntegrationOpen(t *testing.T) {
	requireRoot(t)
	d := attach(t, sparseFile(t, 1<<20), loop.Options{})
	tests := []struct {
		name    string
		number  int
		seq     uint64
		wantErr error
	}{
		{"right diskseq", d.Number(), d.DiskSeq(), nil},
		{"older diskseq", d.Number(), d.DiskSeq() - 1, loop.ErrDiskSeqMismatch},
		{"newer diskseq", d.Number(), d.DiskSeq() + 1000, loop.ErrDiskSeqMismatch},
		{"no such device", 1 << 20, 1, unix.ENOENT},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := loop.Open(tt.number, tt.seq)
			if !errors.Is(err, tt.wantErr) || (err == nil) != (tt.wantErr == nil) {
				t.Fatalf("Open(%d, %d): %v, want %v", tt.number, tt.seq, err, tt.wantErr)
			}
			if err != nil {
				return
			}
			defer got.Close()
			if got.Binding() != d.Binding() {
				t.Errorf("Open binding = %+v, want %+v", got.Binding(), d.Binding())
			}
		})
	}
}

// TestIntegrationNotBound pins an unbound device with an O_EXCL open (which
// makes everyone else's LOOP_CONFIGURE fail EBUSY) so its diskseq stays put,
// then checks Open and Adopt report ErrNotBound.
func TestIntegrationNotBound(t *testing.T) {
	requireRoot(t)
	path := sparseFile(t, 1<<20)
	for try := 0; ; try++ {
		d := attach(t, path, loop.Options{})
		number, seq := d.Number(), d.DiskSeq()
		d.Close()
		waitCleared(t, number, seq)
		fd, err := unix.Open(d.Path(), unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
		if err != nil {
			if try < 10 { // someone else took it meanwhile
				continue
			}
			t.Fatalf("open %s O_EXCL: %v", d.Path(), err)
		}
		if _, err := unix.IoctlLoopGetStatus64(fd); err != unix.ENXIO {
			unix.Close(fd)
			if try < 10 {
				continue
			}
			t.Fatalf("%s rebound before O_EXCL open", d.Path())
		}
		t.Cleanup(func() { unix.Close(fd) })
		seq, err = unix.IoctlGetUint64(fd, unix.BLKGETDISKSEQ)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := loop.Open(number, seq); !errors.Is(err, loop.ErrNotBound) {
			t.Errorf("Open(%d, %d) of unbound device: %v, want ErrNotBound", number, seq, err)
		}
		if _, err := loop.Adopt(fd); !errors.Is(err, loop.ErrNotBound) {
			t.Errorf("Adopt(unbound %s): %v, want ErrNotBound", d.Path(), err)
		}
		return
	}
}

func TestIntegrationAdopt(t *testing.T) {
	requireRoot(t)
	path := sparseFile(t, 1<<20)
	d := attach(t, path, loop.Options{})

	dup, err := unix.FcntlInt(uintptr(d.Fd()), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	adopted, err := loop.Adopt(dup)
	if err != nil {
		unix.Close(dup)
		t.Fatalf("Adopt(dup of %s): %v", d.Path(), err)
	}
	t.Cleanup(func() { adopted.Close() })
	if adopted.Binding() != d.Binding() {
		t.Errorf("Adopt binding = %+v, want %+v", adopted.Binding(), d.Binding())
	}

	for _, name := range []string{path, "/dev/null"} {
		fd, err := unix.Open(name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		if _, err := loop.Adopt(fd); !errors.Is(err, loop.ErrNotLoop) {
			t.Errorf("Adopt(%s): %v, want ErrNotLoop", name, err)
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			t.Errorf("Adopt(%s) failed but closed the fd: %v", name, err)
		}
	}
}

func TestIntegrationFindByBacking(t *testing.T) {
	requireRoot(t)
	path := sparseFile(t, 1<<20)
	ours := attach(t, path, loop.Options{})

	// losetup sets no AUTOCLEAR: the device stays bound to our file until
	// the cleanup detaches it.
	foreign := looptest.Losetup(t, path).Path

	found, err := loop.FindByBacking(ours.Backing(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, b := range found {
		paths = append(paths, b.Path)
		if b.Backing != ours.Backing() {
			t.Errorf("FindByBacking returned %s bound to %v", b.Path, b.Backing)
		}
	}
	for _, want := range []string{ours.Path(), foreign} {
		if !strings.Contains(" "+strings.Join(paths, " ")+" ", " "+want+" ") {
			t.Errorf("FindByBacking(%v) = %v, missing %s", ours.Backing(), paths, want)
		}
	}
	if len(found) != 2 {
		t.Errorf("FindByBacking(%v) = %v, want exactly %s and %s", ours.Backing(), paths, ours.Path(), foreign)
	}

	all, err := loop.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range all {
		if b.Path == ours.Path() && b != ours.Binding() {
			t.Errorf("List entry %+v, want %+v", b, ours.Binding())
		}
	}
}

func TestIntegrationFindByBackingSkip(t *testing.T) {
	requireRoot(t)
	path := sparseFile(t, 1<<20)
	ours := attach(t, path, loop.Options{})
	ours2 := attach(t, path, loop.Options{ReadOnly: true})

	foreign := looptest.Losetup(t, path).Path

	held := map[string]bool{ours.Path(): true, ours2.Path(): true}
	asked := map[string]bool{}
	found, err := loop.FindByBacking(ours.Backing(), func(p string) bool {
		asked[p] = true
		return held[p]
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || found[0].Path != foreign || found[0].Backing != ours.Backing() {
		t.Errorf("FindByBacking with skip = %+v, want only %s bound to %v", found, foreign, ours.Backing())
	}
	for _, p := range []string{ours.Path(), ours2.Path(), foreign} {
		if !asked[p] {
			t.Errorf("skip was not asked about %s (asked %v)", p, asked)
		}
	}
}

func TestIntegrationBadInput(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	regular := sparseFile(t, 1<<20)
	empty := filepath.Join(dir, "empty.img")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("x", 64)

	tests := []struct {
		name     string
		path     string
		openRO   bool // how the test opens the backing file for Attach
		opts     loop.Options
		wantOpen error // from OpenBacking(path, opts.ReadOnly)
		want     error // from Attach
		errno    error // Attach's error also matches this errno
	}{
		{"directory", dir, true, loop.Options{ReadOnly: true}, loop.ErrDirectory, loop.ErrDirectory, unix.EISDIR},
		{"fifo", fifo, false, loop.Options{}, loop.ErrFIFO, loop.ErrFIFO, unix.EINVAL},
		{"char device", "/dev/null", false, loop.Options{}, loop.ErrCharDevice, loop.ErrCharDevice, unix.EINVAL},
		{"empty file", empty, false, loop.Options{}, loop.ErrEmptyFile, loop.ErrEmptyFile, unix.EINVAL},
		{"rw device on ro fd", regular, true, loop.Options{}, nil, loop.ErrReadOnlyFile, unix.EROFS},
		{"tag too long", regular, false, loop.Options{Tag: long}, nil, loop.ErrTagTooLong, unix.EINVAL},
		{"tag with NUL", regular, false, loop.Options{Tag: "a\x00b"}, nil, loop.ErrTagTooLong, unix.EINVAL},
		{"block size 1000", regular, false, loop.Options{BlockSize: 1000}, nil, loop.ErrBlockSize, unix.EINVAL},
		{"block size 256", regular, false, loop.Options{BlockSize: 256}, nil, loop.ErrBlockSize, unix.EINVAL},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := loop.OpenBacking(tt.path, tt.opts.ReadOnly)
			if err == nil {
				f.Close()
			}
			if !errors.Is(err, tt.wantOpen) || (err == nil) != (tt.wantOpen == nil) {
				t.Errorf("OpenBacking(%s): %v, want %v", tt.path, err, tt.wantOpen)
			}

			// Attach gets an fd opened behind OpenBacking's back, as a
			// careless caller would (O_NONBLOCK: a FIFO must not block).
			mode := unix.O_RDWR
			if tt.openRO {
				mode = unix.O_RDONLY
			}
			fd, err := unix.Open(tt.path, mode|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
			if err != nil {
				t.Fatal(err)
			}
			backing := os.NewFile(uintptr(fd), tt.path)
			t.Cleanup(func() { backing.Close() })
			d, err := loop.Attach(backing, tt.opts)
			if err == nil {
				d.Close()
				t.Fatalf("Attach(%s, %+v) succeeded", tt.path, tt.opts)
			}
			if !errors.Is(err, tt.want) || !errors.Is(err, tt.errno) {
				t.Errorf("Attach(%s): %v, want %v (and errno %v)", tt.path, err, tt.want, tt.errno)
			}
			var op *loop.OpError
			if !errors.As(err, &op) || op.Dev != tt.path {
				t.Errorf("Attach(%s): %#v, want *OpError naming the file", tt.path, err)
			}
		})
	}

	t.Run("nonexistent", func(t *testing.T) {
		path := filepath.Join(dir, "missing.img")
		if _, err := loop.OpenBacking(path, false); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("OpenBacking(%s): %v, want fs.ErrNotExist", path, err)
		}
	})
	t.Run("write-only fd", func(t *testing.T) {
		fd, err := unix.Open(regular, unix.O_WRONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		backing := os.NewFile(uintptr(fd), regular)
		t.Cleanup(func() { backing.Close() })
		if d, err := loop.Attach(backing, loop.Options{}); !errors.Is(err, loop.ErrNotReadable) {
			if err == nil {
				d.Close()
			}
			t.Errorf("Attach(write-only fd): %v, want ErrNotReadable", err)
		}
	})
}

// TestIntegrationConcurrentChurn: 16 goroutines × 50 attach/verify/close
// cycles while a `losetup -f` / `losetup -d` loop (outside our flock) races
// for the same free devices.
func TestIntegrationConcurrentChurn(t *testing.T) {
	requireRoot(t)
	const goroutines, cycles = 16, 50
	tag := testTag(t)

	churnFile := sparseFile(t, 1<<20)
	stopFile := filepath.Join(t.TempDir(), "stop")
	// The churn detaches only what it attached itself, by the path losetup
	// printed. Four loops: a losetup that loses a race to us sleeps 200 ms
	// (util-linux create_loop), so one loop alone is mostly asleep.
	churn := exec.Command("bash", "-c", `
		for i in 1 2 3 4; do
			while [ ! -e "$2" ]; do
				if d=$(losetup -f --show "$1" 2>/dev/null); then
					losetup -d "$d" && echo ok
				fi
			done &
		done
		wait`, "churn", churnFile, stopFile)
	churnOut, err := churn.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	churn.Stderr = os.Stderr
	if err := churn.Start(); err != nil {
		t.Fatal(err)
	}
	// Count the churn's cycles; start racing it once it has done one.
	var churnCycles atomic.Int64
	churnRunning := make(chan struct{})
	go func() {
		lines := bufio.NewScanner(churnOut)
		for lines.Scan() {
			if churnCycles.Add(1) == 1 {
				close(churnRunning)
			}
		}
	}()
	var stopOnce sync.Once
	stopChurn := func() {
		stopOnce.Do(func() {
			os.WriteFile(stopFile, nil, 0o600)
			if err := churn.Wait(); err != nil {
				t.Errorf("churn: %v", err)
			}
			// A device the churn bound to its own file and failed to
			// detach. `losetup -d` of a device another opener (udev's
			// probe) still holds only sets AUTOCLEAR: the kernel unbinds
			// it at that opener's last close, so wait for it as
			// waitNoneBound does.
			var left []string
			for deadline := time.Now().Add(waitLimit); ; time.Sleep(time.Millisecond) {
				if left = boundTo(churnFile); len(left) == 0 || time.Now().After(deadline) {
					break
				}
			}
			for _, dev := range left {
				exec.Command("losetup", "-d", dev).Run()
				t.Errorf("churn left %s bound after %v", dev, waitLimit)
			}
		})
	}
	t.Cleanup(stopChurn)

	<-churnRunning
	retriesBefore := loop.Retries()
	var wg sync.WaitGroup
	var attached atomic.Int64
	for g := range goroutines {
		path := sparseFile(t, 1<<20)
		backing := openBacking(t, path, false)
		want := backingID(t, backing)
		wg.Go(func() {
			for c := range cycles {
				d, err := loop.Attach(backing, loop.Options{Tag: tag})
				if err != nil {
					t.Errorf("goroutine %d cycle %d: Attach: %v", g, c, err)
					return
				}
				if d.Backing() != want {
					t.Errorf("goroutine %d: %s bound to %v, want %v", g, d.Path(), d.Backing(), want)
				}
				if err := d.Verify(); err != nil {
					t.Errorf("goroutine %d: %v", g, err)
				}
				if err := d.Close(); err != nil {
					t.Errorf("goroutine %d: %v", g, err)
				}
				attached.Add(1)
			}
		})
	}
	wg.Wait()
	stopChurn()
	t.Logf("%d attach cycles (%d attempts retried); churn did %d losetup cycles meanwhile",
		attached.Load(), loop.Retries()-retriesBefore, churnCycles.Load())
	waitNoneBound(t)
}

// TestIntegrationBusyFreeDevice makes the device LOOP_CTL_GET_FREE returns
// unusable (held O_EXCL, so LOOP_CONFIGURE fails EBUSY): Attach must retry
// and then create a fresh device with LOOP_CTL_ADD instead of spinning.
func TestIntegrationBusyFreeDevice(t *testing.T) {
	requireRoot(t)
	path := sparseFile(t, 1<<20)
	for deadline := time.Now().Add(waitLimit); ; {
		busy, _, release := looptest.HoldFree(t)
		before := loop.Retries()
		d := attach(t, path, loop.Options{})
		release()
		if d.Number() == busy {
			t.Fatalf("Attach returned loop%d, which we hold O_EXCL", busy)
		}
		// On a busy machine another device may have become free (and been
		// handed out first) in between: then nothing was exercised, try again.
		if loop.Retries() > before {
			t.Logf("loop%d busy; Attach retried %d times and got loop%d", busy, loop.Retries()-before, d.Number())
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Attach never hit the busy loop%d in %v", busy, waitLimit)
		}
	}
}
