package xenstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/xenstore/xenstoretest"
)

// fakeXenbusDevice forwards a client's requests to xenstored the way Linux's
// xenbus device does (xenbus_dev_frontend.c, xenbus_dev_request_and_reply):
// write(2) copies one message into the file's one message buffer (the rest
// of a longer write is dropped), queues it with its body still pointing into
// that buffer and returns; the xenbus thread copies the body to the ring
// later (here: after sendDelay). A message written meanwhile overwrites the
// buffer, so the earlier one goes out with the later one's bytes under its own
// header. A SOCK_SEQPACKET socket keeps the client's write(2) boundaries;
// replies pass through unchanged, one frame per packet.
type fakeXenbusDevice struct {
	Socket string

	mu   sync.Mutex
	hold *heldMessage // armed by holdNext, taken by the next message the device sends
}

// heldMessage is one message the device keeps from xenstored until letGo:
// taken is closed once the device has it (the client's write returned).
type heldMessage struct {
	taken   chan struct{}
	release chan struct{}
	once    sync.Once
}

func (h *heldMessage) letGo() { h.once.Do(func() { close(h.release) }) }

// holdNext makes the device keep the next message it takes until letGo; the
// test lets it go in its cleanup too.
func (d *fakeXenbusDevice) holdNext(t *testing.T) *heldMessage {
	h := &heldMessage{taken: make(chan struct{}), release: make(chan struct{})}
	t.Cleanup(h.letGo)
	d.mu.Lock()
	d.hold = h
	d.mu.Unlock()
	return h
}

func (d *fakeXenbusDevice) takeHold() *heldMessage {
	d.mu.Lock()
	defer d.mu.Unlock()
	h := d.hold
	d.hold = nil
	return h
}

const sendDelay = 20 * time.Millisecond

func startFakeXenbusDevice(t *testing.T, upstream string) *fakeXenbusDevice {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "xenbus")
	ln, err := net.Listen("unixpacket", sock)
	if err != nil {
		t.Fatal(err)
	}
	dev := &fakeXenbusDevice{Socket: sock}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("unix", upstream)
			if err != nil {
				nc.Close()
				continue
			}
			wg.Add(2)
			go func() { defer wg.Done(); defer nc.Close(); repliesAsPackets(nc, up) }()
			go func() { defer wg.Done(); defer up.Close(); relayLikeXenbus(nc, up, dev.takeHold) }()
		}
	}()
	return dev
}

// repliesAsPackets copies xenstored's replies to the client, one frame per packet.
func repliesAsPackets(client io.Writer, up io.Reader) {
	r := newFrameReader(up)
	for {
		fr, err := r.next()
		if err != nil {
			return
		}
		msg := make([]byte, headerSize, headerSize+len(fr.payload))
		putHeader(msg, fr.typ, fr.reqID, fr.txID, uint32(len(fr.payload)))
		if _, err := client.Write(append(msg, fr.payload...)); err != nil {
			return
		}
	}
}

// relayLikeXenbus reads the client's writes (one packet each) and sends the
// first message of each to up after sendDelay (and after its letGo if
// takeHold hands it a hold), its body taken from the shared buffer at send
// time.
func relayLikeXenbus(client io.Reader, up io.Writer, takeHold func() *heldMessage) {
	var (
		mu     sync.Mutex
		buffer [headerSize + MaxPayload]byte // u->u.buffer
	)
	queue := make(chan [headerSize]byte, 256)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for hdr := range queue {
			if h := takeHold(); h != nil {
				close(h.taken)
				<-h.release
			}
			time.Sleep(sendDelay)
			n := binary.LittleEndian.Uint32(hdr[12:])
			mu.Lock()
			msg := append(hdr[:], buffer[headerSize:headerSize+n]...)
			mu.Unlock()
			if _, err := up.Write(msg); err != nil {
				return
			}
		}
	}()
	defer func() { close(queue); <-done }()
	packet := make([]byte, 64*1024)
	for {
		n, err := client.Read(packet)
		if err != nil {
			return
		}
		if n < headerSize || n > len(buffer) {
			continue // the kernel answers EINVAL to the write; not needed here
		}
		var hdr [headerSize]byte
		copy(hdr[:], packet)
		if headerSize+int(binary.LittleEndian.Uint32(hdr[12:])) > n {
			continue // an incomplete message: not produced by the client
		}
		mu.Lock()
		copy(buffer[:], packet[:n]) // the whole write; only its first message is queued
		mu.Unlock()
		queue <- hdr
	}
}

// dialFake returns a client of the fake device; serial as Dial sets it for a
// xenbus device (true) or a socket (false).
func dialFake(t *testing.T, dev *fakeXenbusDevice, serial bool) *Client {
	t.Helper()
	c := newClient(dev.Socket, func() (*os.File, error) { return dialPacket(dev.Socket) })
	c.serial = serial
	t.Cleanup(func() { c.Close() })
	return c
}

// dialPacket connects a SOCK_SEQPACKET socket, as dialUnix does a stream one.
func dialPacket(path string) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), path), nil
}

// concurrentReads reads n nodes of different lengths at once and returns
// the errors and wrong values seen.
func concurrentReads(t *testing.T, c *Client, n int) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		wrong []string
		start = make(chan struct{})
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			path := fmt.Sprintf("/local/domain/1/backend/vbd/%d/51712/%s", i, nodeName(i))
			got, err := c.Read(ctx, path)
			if want := nodeValue(i); err != nil || got != want {
				mu.Lock()
				wrong = append(wrong, fmt.Sprintf("%s: %q, %v (want %q)", path, got, err, want))
				mu.Unlock()
			}
		}()
	}
	close(start)
	wg.Wait()
	return wrong
}

func nodeName(i int) string  { return []string{"mode", "params", "script", "physical-device"}[i%4] }
func nodeValue(i int) string { return fmt.Sprintf("value-%d-%s", i, nodeName(i)) }

// TestXenbusDeviceOneRequestInFlight: through a xenbus device the client
// sends one request at a time (conn.inflight), so concurrent reads all get
// their own node's value; the control shows that pipelining through the same
// fake device returns wrong answers, as the testbed's driver domain saw
// (EINVAL for reads whose body carried another request's bytes).
func TestXenbusDeviceOneRequestInFlight(t *testing.T) {
	s, direct := serverAndDirect(t)
	const n = 16
	for i := range n {
		if err := direct.Write(context.Background(), fmt.Sprintf("/local/domain/1/backend/vbd/%d/51712/%s", i, nodeName(i)), nodeValue(i)); err != nil {
			t.Fatal(err)
		}
	}
	dev := startFakeXenbusDevice(t, s.Socket)

	t.Run("serial", func(t *testing.T) {
		if wrong := concurrentReads(t, dialFake(t, dev, true), n); len(wrong) > 0 {
			t.Errorf("%d of %d concurrent reads went wrong through the xenbus device:\n%v", len(wrong), n, wrong)
		}
	})
	t.Run("pipelined control", func(t *testing.T) {
		wrong := concurrentReads(t, dialFake(t, dev, false), n)
		if len(wrong) == 0 {
			t.Errorf("pipelined reads through the fake device all succeeded: the fake no longer reproduces the kernel's buffer reuse")
		}
		t.Logf("pipelined: %d of %d reads wrong, e.g. %v", len(wrong), n, wrong[:min(len(wrong), 2)])
	})
}

// TestXenbusDeviceTimeoutKeepsOrder: a caller that gives up waiting does not
// let the next request overwrite the buffer its request still occupies. Here
// an abandoned write is followed at once by a read of another node: the read
// waits for the write's reply, the write lands on its own node, and the other
// node keeps its value (pipelined, the write would go out with the read's
// path and stray bytes as its value).
func TestXenbusDeviceTimeoutKeepsOrder(t *testing.T) {
	ctx := context.Background()
	s, direct := serverAndDirect(t)
	const (
		long  = "/local/domain/1/backend/vbd/0/51712/hotplug-error"
		short = "/local/domain/1/backend/vbd/1/51712/mode"
	)
	if err := direct.Write(ctx, short, "w"); err != nil {
		t.Fatal(err)
	}
	dev := startFakeXenbusDevice(t, s.Socket)
	c := dialFake(t, dev, true)
	if err := c.Write(ctx, "/warm", "up"); err != nil { // connect first
		t.Fatal(err)
	}
	// The caller gives up once the device has its write and before xenstored
	// has seen it: no reply can have come, so the write must fail.
	held := dev.holdNext(t)
	abandon, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { <-held.taken; cancel() }()
	if err := c.Write(abandon, long, "the abandoned write"); !errors.Is(err, context.Canceled) {
		t.Fatalf("write given up while the device held it = %v; want %v", err, context.Canceled)
	}
	held.letGo()
	if got, err := c.Read(ctx, short); err != nil || got != "w" {
		t.Errorf("read after an abandoned write = %q, %v; want \"w\"", got, err)
	}
	if got, err := direct.Read(ctx, long); err != nil || got != "the abandoned write" {
		t.Errorf("the abandoned write stored %q, %v at %s; want \"the abandoned write\"", got, err, long)
	}
	if got, err := direct.Read(ctx, short); err != nil || got != "w" {
		t.Errorf("%s = %q, %v after the abandoned write; want \"w\"", short, got, err)
	}
}

// TestXenbusDeviceBatch: a batch through a xenbus device goes one request per
// write and one at a time, so every operation gets its reply; written back to
// back in one write, as on a socket, all but the first would be dropped by
// the device (the control: they time out).
func TestXenbusDeviceBatch(t *testing.T) {
	ctx := context.Background()
	s, direct := serverAndDirect(t)
	const n = 6
	var ops []Op
	for i := range n {
		path := fmt.Sprintf("/local/domain/1/backend/vbd/%d/51712/%s", i, nodeName(i))
		if err := direct.Write(ctx, path, nodeValue(i)); err != nil {
			t.Fatal(err)
		}
		ops = append(ops, Read(path))
	}
	ops = append(ops, Write("/local/domain/1/backend/vbd/0/51712/hotplug-status", "connected"))
	dev := startFakeXenbusDevice(t, s.Socket)

	t.Run("serial", func(t *testing.T) {
		bounded, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		replies := dialFake(t, dev, true).Batch(bounded, ops)
		for i, r := range replies[:n] {
			if r.Err != nil || r.Value != nodeValue(i) {
				t.Errorf("op %d (%s): %q, %v; want %q", i, ops[i].Path, r.Value, r.Err, nodeValue(i))
			}
		}
		if err := replies[n].Err; err != nil {
			t.Errorf("write in the batch: %v", err)
		}
		if got, err := direct.Read(ctx, ops[n].Path); err != nil || got != "connected" {
			t.Errorf("%s = %q, %v; want \"connected\"", ops[n].Path, got, err)
		}
	})
	t.Run("one write control", func(t *testing.T) {
		short, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		lost := 0
		for _, r := range dialFake(t, dev, false).Batch(short, ops) {
			if r.Err != nil {
				lost++
			}
		}
		if lost != len(ops)-1 {
			t.Errorf("%d of %d operations of a batch in one write failed; want all but the first (the fake no longer drops the rest of a write)", lost, len(ops))
		}
	})
}

// serverAndDirect starts a fake xenstored and a client on its socket
// directly (no fake device), to set up and check nodes.
func serverAndDirect(t *testing.T) (*xenstoretest.Server, *Client) {
	t.Helper()
	s := xenstoretest.NewServer(t, xenstoretest.Options{})
	direct, err := DialUnix(context.Background(), s.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { direct.Close() })
	return s, direct
}
