// Package xenstore is a client for the XenStore wire protocol (unix socket of
// xenstored, or /dev/xen/xenbus). It knows nothing of Xen policy.
//
// One Client is one connection. Requests from many goroutines are pipelined
// on it (on a xenbus device: one at a time, see conn.inflight) and matched
// to their replies by req_id; a single reader goroutine
// demultiplexes replies and watch events. The socket is a raw AF_UNIX fd
// wrapped in an *os.File, which integrates with the runtime poller: the
// client needs nothing of net (the daemon links net/http for its metrics
// anyway; the C entry talks to the daemon, not to XenStore).
package xenstore

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Error is a failed XenStore operation. Replies of type XS_ERROR map to an
// Error whose Err is the matching syscall.Errno (ENOENT, EACCES, EAGAIN,
// EINVAL, E2BIG, ...; oxenstored's EQUOTA maps to EDQUOT), so
// errors.Is(err, unix.ENOENT) and errors.Is(err, fs.ErrNotExist) work.
// Transport failures carry ErrConnectionLost, ErrClosed or the dial errno.
type Error struct {
	Op   string // "read", "write", ...
	Path string
	Err  error
}

func (e *Error) Error() string {
	if e.Path == "" {
		return "xenstore " + e.Op + ": " + e.Err.Error()
	}
	return "xenstore " + e.Op + " " + e.Path + ": " + e.Err.Error()
}

func (e *Error) Unwrap() error { return e.Err }

// ErrClosed: the client was closed. ErrConnectionLost: the connection broke
// while the request was in flight (the request may or may not have happened).
// ErrTooLarge: the request payload exceeds XenStore's 4096-byte limit; it was
// not sent.
var (
	ErrClosed         = errors.New("xenstore: client closed")
	ErrConnectionLost = errors.New("xenstore: connection to xenstored lost")
	ErrTooLarge       = errors.New("xenstore: payload exceeds 4096 bytes")
)

// Perm is one entry of a node's permission list; the first entry names the
// owner and the default access for everyone else.
type Perm struct {
	Domid  uint32
	Access byte // 'n' none, 'r' read, 'w' write, 'b' both
}

// Ops are the node operations, outside (Client) or inside (Tx) a transaction.
// Paths may be relative: xenstored resolves them against the caller's domain.
type Ops interface {
	Read(ctx context.Context, path string) (string, error)
	Write(ctx context.Context, path, value string) error
	Mkdir(ctx context.Context, path string) error
	Rm(ctx context.Context, path string) error
	Directory(ctx context.Context, path string) ([]string, error)
	GetPerms(ctx context.Context, path string) ([]Perm, error)
	SetPerms(ctx context.Context, path string, perms []Perm) error
}

var (
	_ Ops = (*Client)(nil)
	_ Ops = (*Tx)(nil)
)

// Client is one connection to XenStore, safe for concurrent use. When the
// connection breaks (xenstored restarted: the reader sees EOF at once), the
// client dials again in the background, with backoff, and re-registers its
// watches, each of which fires its initial event again; events that happened
// while disconnected are not replayed. A call made meanwhile dials itself.
type Client struct {
	target string                   // socket or device path, for errors
	open   func() (*os.File, error) // dials the transport
	serial bool                     // one request in flight at a time (a xenbus device: see conn.inflight)

	reqID atomic.Uint32

	dialMu sync.Mutex // serialises reconnects (held while dialling and re-registering watches)

	mu        sync.Mutex // guards conn, dialing, closed, redialing, onConn; never held while waiting
	conn      *conn      // the live connection, or nil / dead
	dialing   *conn      // a connection being set up, so Close can break it
	closed    bool
	done      chan struct{} // closed by Close: stops a background redial
	redialing bool          // a background redial runs
	onConn    func(up bool, err error)

	watchMu  sync.RWMutex      // guards watches and watchSeq
	watches  map[string]*Watch // by wire token
	watchSeq uint64
}

// conn is one transport connection; a Client replaces it after it dies.
type conn struct {
	f *os.File

	// inflight, on a xenbus device, holds a token from a request's write
	// until a reply arrives: one request in flight at a time, as
	// libxenstore does. Linux's xenbus device (drivers/xen/xenbus/
	// xenbus_dev_frontend.c, xenbus_dev_request_and_reply in xenbus_xs.c)
	// queues a request with its body still pointing into the file's single
	// message buffer and returns from write(2) before the xenbus thread has
	// copied it to the ring; the next write overwrites that buffer, so a
	// pipelined request goes out with a later request's body under its own
	// header. Seen in the testbed's driver domain: reads failed with EINVAL
	// ("path\0" plus stray bytes), and a write could store another request's
	// bytes. The reader gives the token back on every reply (any reply is the
	// one request's), so a caller that gave up waiting still holds the next
	// request back until the kernel is done with the buffer. nil on sockets,
	// which copy what is written.
	inflight chan struct{}

	mu      sync.Mutex // guards pending and err
	pending map[uint32]chan frame
	err     error         // why the connection died; nil while alive
	dead    chan struct{} // closed when err is set
}

// Dial connects to $XENSTORED_PATH if it is set (a socket, or a xenbus-like
// device when the path is not a socket), else to the first of
// /run/xenstored/socket and /var/run/xenstored/socket that accepts, else
// opens /dev/xen/xenbus. Unlike libxenstore, a set XENSTORED_PATH is never
// followed by a fallback: a test pointed at a private daemon must not reach
// the host's.
func Dial(ctx context.Context) (*Client, error) {
	env, set := os.LookupEnv("XENSTORED_PATH")
	return dialTransports(ctx, chooseTransports(env, set, defaultSockets, defaultXenbus))
}

// DialUnix connects to the xenstored unix socket at path.
func DialUnix(ctx context.Context, path string) (*Client, error) {
	return dialTransports(ctx, []transport{{path: path, unix: true}})
}

// OpenXenbus opens the kernel's xenbus device (usually /dev/xen/xenbus).
func OpenXenbus(ctx context.Context, path string) (*Client, error) {
	return dialTransports(ctx, []transport{{path: path}})
}

// Target is the socket or device path the client dialled (and redials): in a
// driver domain /dev/xen/xenbus, in dom0 xenstored's socket.
func (c *Client) Target() string { return c.target }

// newClient returns a client that dials with open; it connects on first use.
func newClient(target string, open func() (*os.File, error)) *Client {
	return &Client{target: target, open: open, watches: make(map[string]*Watch), done: make(chan struct{})}
}

// newConn returns a connection on f; serial: one request in flight at a time
// (conn.inflight).
func newConn(f *os.File, serial bool) *conn {
	cn := &conn{f: f, pending: make(map[uint32]chan frame), dead: make(chan struct{})}
	if serial {
		cn.inflight = make(chan struct{}, 1)
	}
	return cn
}

// Redial backoff after a lost connection: from redialMin, doubling, at most
// redialMax between attempts (jittered), so a restarted xenstored is back in
// use within about a second.
const (
	redialMin = 50 * time.Millisecond
	redialMax = time.Second
)

// OnConnection registers f, called (from another goroutine) with up=false and
// the reason when the connection breaks, and with up=true when a background
// redial has restored it (watches re-registered). Set it before use.
func (c *Client) OnConnection(f func(up bool, err error)) {
	c.mu.Lock()
	c.onConn = f
	c.mu.Unlock()
}

// Connected reports whether the client has a live connection now.
func (c *Client) Connected() bool {
	cn, _ := c.live()
	return cn != nil
}

// lost is called by the reader of cn once cn has died: unless the client was
// closed or cn was already replaced, it reports the loss and starts a
// background redial.
func (c *Client) lost(cn *conn) {
	err := cn.deadErr()
	c.mu.Lock()
	if c.closed || c.conn != cn || c.redialing || errors.Is(err, ErrClosed) {
		c.mu.Unlock()
		return
	}
	c.redialing = true
	notify := c.onConn
	c.mu.Unlock()
	if notify != nil {
		notify(false, err)
	}
	go c.redial(notify)
}

// redial dials until it succeeds or the client is closed.
func (c *Client) redial(notify func(bool, error)) {
	defer func() {
		c.mu.Lock()
		c.redialing = false
		c.mu.Unlock()
	}()
	for delay := redialMin; ; delay = min(2*delay, redialMax) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := c.connect(ctx)
		cancel()
		if err == nil {
			if notify != nil {
				notify(true, nil)
			}
			return
		}
		if errors.Is(err, ErrClosed) {
			return
		}
		t := time.NewTimer(delay/2 + rand.N(delay/2+1))
		select {
		case <-c.done:
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// Close closes the connection. In-flight calls fail with ErrClosed, and the
// channels of all watches are closed.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	close(c.done)
	cn, dialing := c.conn, c.dialing
	c.conn, c.dialing = nil, nil
	c.mu.Unlock()
	for _, cn := range []*conn{cn, dialing} {
		if cn != nil {
			cn.fail(ErrClosed)
		}
	}
	c.watchMu.Lock()
	ws := c.watches
	c.watches = map[string]*Watch{}
	c.watchMu.Unlock()
	for _, w := range ws {
		w.stop()
	}
	return nil
}

// connect returns the live connection, dialling a new one (and re-registering
// watches on it) if there is none or the last one died. Other callers wait
// for a reconnect in progress, so they never overtake the re-registration.
func (c *Client) connect(ctx context.Context) (*conn, error) {
	if cn, err := c.live(); cn != nil || err != nil {
		return cn, err
	}
	c.dialMu.Lock()
	defer c.dialMu.Unlock()
	if cn, err := c.live(); cn != nil || err != nil {
		return cn, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f, err := c.open()
	if err != nil {
		return nil, &Error{Op: "dial", Path: c.target, Err: err}
	}
	cn := newConn(f, c.serial)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		f.Close()
		return nil, ErrClosed
	}
	c.dialing = cn
	c.mu.Unlock()
	go cn.readLoop(c)

	c.watchMu.RLock()
	ws := make([]*Watch, 0, len(c.watches))
	for _, w := range c.watches {
		ws = append(ws, w)
	}
	c.watchMu.RUnlock()
	for _, w := range ws {
		_, err := c.do(ctx, cn, typeWatch, 0, "watch", w.path, w.path, "\x00", w.wireToken, "\x00")
		if err != nil && !errors.Is(err, unix.EEXIST) {
			cn.fail(ErrConnectionLost)
			c.mu.Lock()
			c.dialing = nil
			c.mu.Unlock()
			return nil, fmt.Errorf("re-register watches after reconnect: %w", err)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dialing = nil
	if c.closed {
		cn.fail(ErrClosed)
		return nil, ErrClosed
	}
	c.conn = cn
	return cn, nil
}

// live returns the current connection if it is alive, or ErrClosed.
func (c *Client) live() (*conn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrClosed
	}
	if cn := c.conn; cn != nil && cn.alive() {
		return cn, nil
	}
	return nil, nil
}

func (cn *conn) alive() bool {
	select {
	case <-cn.dead:
		return false
	default:
		return true
	}
}

// fail marks the connection dead with err (the first error wins), closes the
// transport and fails every pending request. For a blocking (non-pollable)
// xenbus file the reader goroutine stays parked in read(2) until the next
// message, but no caller waits for it.
func (cn *conn) fail(err error) {
	cn.mu.Lock()
	if cn.err != nil {
		cn.mu.Unlock()
		return
	}
	cn.err = err
	cn.pending = nil
	close(cn.dead)
	cn.mu.Unlock()
	cn.f.Close()
}

func (cn *conn) deadErr() error {
	cn.mu.Lock()
	defer cn.mu.Unlock()
	return cn.err
}

// readLoop is the connection's only reader: it hands replies to the waiting
// caller by req_id and queues watch events on their Watch. Events are queued
// before any later reply is handed over, so an event that cxenstored sends
// before the reply of the request that caused it is queued by the time that
// request's call returns.
func (cn *conn) readLoop(c *Client) {
	r := newFrameReader(cn.f)
	for {
		fr, err := r.next()
		if err != nil {
			cn.fail(fmt.Errorf("%w: %w", ErrConnectionLost, err))
			c.lost(cn)
			return
		}
		if fr.typ == typeWatchEvent {
			c.dispatch(fr.payload)
			continue
		}
		cn.mu.Lock()
		ch, ok := cn.pending[fr.reqID]
		delete(cn.pending, fr.reqID)
		cn.mu.Unlock()
		if cn.inflight != nil {
			select {
			case <-cn.inflight: // the request is done with the device's buffer
			default:
			}
		}
		if ok {
			ch <- fr // buffered: never blocks
		}
	}
}

// dispatch queues a watch event on the watch that owns its token; events for
// unknown tokens (a watch closed meanwhile) are dropped.
func (c *Client) dispatch(payload []byte) {
	path, wireToken, err := parseWatchEvent(payload)
	if err != nil {
		return
	}
	c.watchMu.RLock()
	w := c.watches[wireToken]
	c.watchMu.RUnlock()
	if w != nil {
		w.push(Event{Path: path, Token: w.token})
	}
}

var replyChans = sync.Pool{New: func() any { return make(chan frame, 1) }}

// do sends one request and waits for its reply. pin, if set, is the
// connection a transaction lives on: it is never replaced by a reconnect.
// args are joined as they go on the wire; the caller supplies the NULs.
func (c *Client) do(ctx context.Context, pin *conn, typ, txID uint32, op, path string, args ...string) ([]byte, error) {
	r := request{typ: typ, op: op, path: path, args: args}
	if err := c.send(ctx, pin, txID, []*request{&r}); err != nil {
		return nil, err
	}
	return r.wait(ctx)
}

// request is one request on the wire and, once sent, the wait for its reply.
type request struct {
	typ      uint32
	op, path string   // for errors
	args     []string // joined as they go on the wire; the caller supplies the NULs

	cn  *conn
	id  uint32
	ch  chan frame
	err error // the request could not be sent
}

// send writes reqs back to back in one write(2) and registers each for its
// reply; wait collects them. If the connection cannot be had, every request
// carries that error and send returns it.
func (c *Client) send(ctx context.Context, pin *conn, txID uint32, reqs []*request) error {
	sizes, live := make([]int, len(reqs)), 0
	for i, r := range reqs {
		if r.err != nil {
			continue
		}
		for _, a := range r.args {
			sizes[i] += len(a)
		}
		if sizes[i] > MaxPayload {
			r.err = &Error{Op: r.op, Path: r.path, Err: fmt.Errorf("%w (%d bytes)", ErrTooLarge, sizes[i])}
		} else {
			live++
		}
	}
	if live == 0 {
		return reqs[0].err
	}
	if err := ctx.Err(); err != nil {
		return failAll(reqs, err)
	}
	cn := pin
	if cn == nil {
		var err error
		if cn, err = c.connect(ctx); err != nil {
			var xe *Error
			if errors.As(err, &xe) {
				for _, r := range reqs {
					r.err = err
				}
				return err
			}
			return failAll(reqs, err)
		}
	}
	if cn.inflight != nil {
		c.sendOneByOne(ctx, cn, txID, reqs, sizes)
		return nil
	}
	total := 0
	for _, n := range sizes {
		total += headerSize + n
	}
	msg := make([]byte, 0, total)
	for i, r := range reqs {
		if r.err != nil {
			continue
		}
		r.cn, r.id, r.ch = cn, c.nextID(), replyChans.Get().(chan frame)
		msg = append(msg, make([]byte, headerSize)...)
		putHeader(msg[len(msg)-headerSize:], r.typ, r.id, txID, uint32(sizes[i]))
		for _, a := range r.args {
			msg = append(msg, a...)
		}
	}
	cn.mu.Lock()
	if cn.err != nil {
		err := cn.err
		cn.mu.Unlock()
		for _, r := range reqs {
			if r.ch != nil {
				replyChans.Put(r.ch)
				r.ch = nil
			}
		}
		return failAll(reqs, err)
	}
	for _, r := range reqs {
		if r.ch != nil {
			cn.pending[r.id] = r.ch
		}
	}
	cn.mu.Unlock()
	// os.File.Write holds the fd's write lock for the whole buffer, so
	// concurrent requests never interleave on the wire.
	if len(msg) > 0 {
		if _, err := cn.f.Write(msg); err != nil {
			cn.fail(fmt.Errorf("%w: %w", ErrConnectionLost, err))
		}
	}
	return nil
}

// sendOneByOne is send on a xenbus device: each request is written alone,
// once the reply to the one before it has come (conn.inflight). The device
// also takes only one message per write(2): it copies the whole write into
// its message buffer, handles the first message and drops the rest, so a
// batch written back to back would lose all but its first request. A request
// that cannot be sent carries the error for wait.
func (c *Client) sendOneByOne(ctx context.Context, cn *conn, txID uint32, reqs []*request, sizes []int) {
	for i, r := range reqs {
		if r.err != nil {
			continue
		}
		select {
		case cn.inflight <- struct{}{}:
		case <-cn.dead:
			r.err = &Error{Op: r.op, Path: r.path, Err: cn.deadErr()}
			continue
		case <-ctx.Done():
			r.err = &Error{Op: r.op, Path: r.path, Err: ctx.Err()}
			continue
		}
		r.cn, r.id = cn, c.nextID()
		msg := make([]byte, headerSize, headerSize+sizes[i])
		putHeader(msg, r.typ, r.id, txID, uint32(sizes[i]))
		for _, a := range r.args {
			msg = append(msg, a...)
		}
		cn.mu.Lock()
		if cn.err != nil {
			r.err = &Error{Op: r.op, Path: r.path, Err: cn.err}
			cn.mu.Unlock()
			continue
		}
		r.ch = replyChans.Get().(chan frame)
		cn.pending[r.id] = r.ch
		cn.mu.Unlock()
		if _, err := cn.f.Write(msg); err != nil {
			cn.fail(fmt.Errorf("%w: %w", ErrConnectionLost, err))
		}
	}
}

// failAll fails every request not failed yet with err.
func failAll(reqs []*request, err error) error {
	for _, r := range reqs {
		if r.err == nil {
			r.err = &Error{Op: r.op, Path: r.path, Err: err}
		}
	}
	return reqs[0].err
}

func (c *Client) nextID() uint32 {
	id := c.reqID.Add(1)
	if id == 0 { // req_id 0 is what watch events carry
		id = c.reqID.Add(1)
	}
	return id
}

// wait returns r's reply payload.
func (r *request) wait(ctx context.Context) ([]byte, error) {
	if r.err != nil {
		return nil, r.err
	}
	var fr frame
	select {
	case fr = <-r.ch:
	case <-r.cn.dead:
		select {
		case fr = <-r.ch: // the reply won the race against the failure
		default:
			return nil, &Error{Op: r.op, Path: r.path, Err: r.cn.deadErr()}
		}
	case <-ctx.Done():
		r.cn.mu.Lock()
		delete(r.cn.pending, r.id)
		r.cn.mu.Unlock()
		// ch may still receive a late reply: do not return it to the pool.
		return nil, &Error{Op: r.op, Path: r.path, Err: ctx.Err()}
	}
	replyChans.Put(r.ch)
	switch fr.typ {
	case r.typ:
		return fr.payload, nil
	case typeError:
		return nil, &Error{Op: r.op, Path: r.path, Err: parseError(fr.payload)}
	default:
		return nil, &Error{Op: r.op, Path: r.path, Err: fmt.Errorf("protocol error: reply type %d to request type %d", fr.typ, r.typ)}
	}
}

// ops implements Ops for a Client (pin nil, txID 0) or a Tx.
type ops struct {
	c    *Client
	pin  *conn
	txID uint32
}

// one runs a single op as a batch of one would, without the batch's slices:
// the request is encoded and the reply decoded in one place (batch.go).
func (o ops) one(ctx context.Context, op Op) Reply {
	r := op.request()
	if r.err != nil {
		return Reply{Err: r.err}
	}
	p, err := o.c.do(ctx, o.pin, r.typ, o.txID, r.op, r.path, r.args...)
	return reply(ctx, op, o, p, err)
}

func (o ops) read(ctx context.Context, path string) (string, error) {
	r := o.one(ctx, Read(path))
	return r.Value, r.Err
}

func (o ops) write(ctx context.Context, path, value string) error {
	return o.one(ctx, Write(path, value)).Err
}

func (o ops) mkdir(ctx context.Context, path string) error {
	_, err := o.c.do(ctx, o.pin, typeMkdir, o.txID, "mkdir", path, path, "\x00")
	return err
}

func (o ops) rm(ctx context.Context, path string) error {
	return o.one(ctx, Rm(path)).Err
}

// directory lists path; names that do not fit one 4096-byte reply (e.g.
// backend/vbd of a host with ~700 domains or more) are listed in parts
// (reply, directoryParts).
func (o ops) directory(ctx context.Context, path string) ([]string, error) {
	r := o.one(ctx, Directory(path))
	return r.Names, r.Err
}

// maxDirectoryRestarts bounds how often a listing in parts starts again
// because the directory changed between two parts.
const maxDirectoryRestarts = 16

// directoryParts lists path with XS_DIRECTORY_PART, as libxenstore's
// xs_directory_part does: each reply is the node's generation, then as many
// NUL-terminated names as fit, from byte offset off of the whole list; the
// last part ends with an empty name. A generation that changes between parts
// means the directory changed: start again.
func (o ops) directoryParts(ctx context.Context, path string) ([]string, error) {
	var names []byte
	generation := ""
	for restarts := 0; ; {
		off := strconv.Itoa(len(names))
		p, err := o.c.do(ctx, o.pin, typeDirectoryPart, o.txID, "directory", path, path, "\x00", off, "\x00")
		if err != nil {
			return nil, err
		}
		gen, chunk, err := parseDirectoryPart(p)
		if err != nil {
			return nil, &Error{Op: "directory", Path: path, Err: err}
		}
		if len(names) > 0 && gen != generation {
			if restarts++; restarts > maxDirectoryRestarts {
				return nil, &Error{Op: "directory", Path: path,
					Err: fmt.Errorf("directory kept changing while listed in parts: %w", unix.EAGAIN)}
			}
			names, generation = names[:0], ""
			continue
		}
		generation = gen
		names = append(names, chunk...)
		if len(chunk) == 0 {
			return nil, &Error{Op: "directory", Path: path,
				Err: fmt.Errorf("empty directory part at offset %s: %w", off, unix.EINVAL)}
		}
		if len(names) <= 1 || names[len(names)-2] == 0 {
			// The closing empty name: drop its NUL, parse the rest.
			return parseDirectory(names[:len(names)-1]), nil
		}
	}
}

func (o ops) getPerms(ctx context.Context, path string) ([]Perm, error) {
	r := o.one(ctx, GetPerms(path))
	return r.Perms, r.Err
}

func (o ops) setPerms(ctx context.Context, path string, perms []Perm) error {
	if len(perms) == 0 {
		return &Error{Op: "set-perms", Path: path, Err: fmt.Errorf("empty permission list: %w", unix.EINVAL)}
	}
	args := make([]string, 0, 2+len(perms))
	args = append(args, path, "\x00")
	for _, p := range perms {
		switch p.Access {
		case 'n', 'r', 'w', 'b':
		default:
			return &Error{Op: "set-perms", Path: path, Err: fmt.Errorf("access %q is not one of n, r, w, b: %w", p.Access, unix.EINVAL)}
		}
		args = append(args, formatPerm(p), "\x00")
	}
	_, err := o.c.do(ctx, o.pin, typeSetPerms, o.txID, "set-perms", path, args...)
	return err
}

// Read returns the value of the node at path.
func (c *Client) Read(ctx context.Context, path string) (string, error) {
	return ops{c: c}.read(ctx, path)
}

// Write sets the value of the node at path, creating it and missing parents.
func (c *Client) Write(ctx context.Context, path, value string) error {
	return ops{c: c}.write(ctx, path, value)
}

// Mkdir creates the node at path with an empty value; an existing node is kept.
func (c *Client) Mkdir(ctx context.Context, path string) error { return ops{c: c}.mkdir(ctx, path) }

// Rm removes the node at path and everything below it.
func (c *Client) Rm(ctx context.Context, path string) error { return ops{c: c}.rm(ctx, path) }

// Directory returns the names (not paths) of the children of path.
func (c *Client) Directory(ctx context.Context, path string) ([]string, error) {
	return ops{c: c}.directory(ctx, path)
}

// GetPerms returns the permission list of the node at path.
func (c *Client) GetPerms(ctx context.Context, path string) ([]Perm, error) {
	return ops{c: c}.getPerms(ctx, path)
}

// SetPerms replaces the permission list of the node at path.
func (c *Client) SetPerms(ctx context.Context, path string, perms []Perm) error {
	return ops{c: c}.setPerms(ctx, path, perms)
}

// Tx is an open transaction; it implements Ops. It lives on the connection it
// was started on: if that connection dies, its calls fail with
// ErrConnectionLost and the transaction must be started again.
type Tx struct {
	o     ops
	ended atomic.Bool
}

// Begin starts a transaction.
func (c *Client) Begin(ctx context.Context) (*Tx, error) {
	cn, err := c.connect(ctx)
	if err != nil {
		var xe *Error
		if errors.As(err, &xe) {
			return nil, err
		}
		return nil, &Error{Op: "transaction-start", Err: err}
	}
	p, err := c.do(ctx, cn, typeTransactionStart, 0, "transaction-start", "", "\x00")
	if err != nil {
		return nil, err
	}
	id, err := parseTxID(p)
	if err != nil {
		return nil, &Error{Op: "transaction-start", Err: err}
	}
	return &Tx{o: ops{c: c, pin: cn, txID: id}}, nil
}

// Commit ends the transaction; a conflict returns an error matching unix.EAGAIN.
func (t *Tx) Commit(ctx context.Context) error { return t.end(ctx, "commit", "T\x00") }

// Abort ends the transaction without applying it. Aborting a transaction
// that already ended is a no-op.
func (t *Tx) Abort(ctx context.Context) error { return t.end(ctx, "abort", "F\x00") }

func (t *Tx) end(ctx context.Context, op, arg string) error {
	if t.ended.Swap(true) {
		if op == "abort" {
			return nil
		}
		return &Error{Op: op, Err: fmt.Errorf("transaction %d already ended: %w", t.o.txID, unix.EINVAL)}
	}
	_, err := t.o.c.do(ctx, t.o.pin, typeTransactionEnd, t.o.txID, op, "", arg)
	return err
}

// Read returns the value of the node at path as the transaction sees it.
func (t *Tx) Read(ctx context.Context, path string) (string, error) { return t.o.read(ctx, path) }

// Write sets the value of the node at path within the transaction.
func (t *Tx) Write(ctx context.Context, path, value string) error {
	return t.o.write(ctx, path, value)
}

// Mkdir creates the node at path within the transaction.
func (t *Tx) Mkdir(ctx context.Context, path string) error { return t.o.mkdir(ctx, path) }

// Rm removes the node at path (and below) within the transaction.
func (t *Tx) Rm(ctx context.Context, path string) error { return t.o.rm(ctx, path) }

// Directory lists the children of path as the transaction sees them.
func (t *Tx) Directory(ctx context.Context, path string) ([]string, error) {
	return t.o.directory(ctx, path)
}

// GetPerms returns the permission list of path as the transaction sees it.
func (t *Tx) GetPerms(ctx context.Context, path string) ([]Perm, error) {
	return t.o.getPerms(ctx, path)
}

// SetPerms replaces the permission list of path within the transaction.
func (t *Tx) SetPerms(ctx context.Context, path string, perms []Perm) error {
	return t.o.setPerms(ctx, path, perms)
}

// Retry bounds of Transaction: at most maxTxAttempts runs of fn, sleeping a
// jittered, doubling backoff (from 1 ms, capped at 100 ms) between them.
const (
	maxTxAttempts = 20
	minTxBackoff  = time.Millisecond
	maxTxBackoff  = 100 * time.Millisecond
)

// Transaction runs fn in a transaction and commits it, retrying the whole thing
// (bounded, with backoff) when the commit reports EAGAIN. fn must be idempotent.
// If fn returns an error the transaction is aborted and the error returned
// (an EAGAIN from fn is retried like a conflicting commit).
func (c *Client) Transaction(ctx context.Context, fn func(tx *Tx) error) error {
	backoff := minTxBackoff
	for attempt := 1; ; attempt++ {
		tx, err := c.Begin(ctx)
		if err != nil {
			return err
		}
		if err = fn(tx); err != nil {
			tx.Abort(ctx) // best effort: the error from fn is what matters
		} else {
			err = tx.Commit(ctx)
		}
		if err == nil || !errors.Is(err, unix.EAGAIN) {
			return err
		}
		if attempt == maxTxAttempts {
			return fmt.Errorf("transaction still conflicting after %d attempts: %w", attempt, err)
		}
		sleep := backoff/2 + rand.N(backoff/2+1)
		t := time.NewTimer(sleep)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return &Error{Op: "transaction", Err: ctx.Err()}
		}
		backoff = min(2*backoff, maxTxBackoff)
	}
}

// Event is one watch firing: the path that changed (in the form the watch was
// registered) and the watch's token.
type Event struct {
	Path  string
	Token string
}

// Watch is a registered watch. Events are delivered in order, without loss
// (the queue is unbounded), including the initial event XS_WATCH fires.
type Watch struct {
	c         *Client
	path      string
	token     string
	wireToken string // unique per client, so events route to one Watch

	events chan Event
	wake   chan struct{} // capacity 1: "queue is not empty"
	done   chan struct{} // closed by stop

	mu      sync.Mutex // guards queue, pushed and stopped
	queue   []Event
	pushed  int // events queued so far (for tests)
	stopped bool
}

// Watch registers a watch on path (and everything below it). The returned
// Watch's channel receives the initial event XS_WATCH fires, then one event per
// change. The token is reported in every Event; it need not be unique.
func (c *Client) Watch(ctx context.Context, path, token string) (*Watch, error) {
	w := &Watch{
		c:      c,
		path:   path,
		token:  token,
		events: make(chan Event),
		wake:   make(chan struct{}, 1),
		done:   make(chan struct{}),
	}
	c.watchMu.Lock()
	c.watchSeq++
	w.wireToken = strconv.FormatUint(c.watchSeq, 36) + ":" + token
	c.watches[w.wireToken] = w
	c.watchMu.Unlock()
	go w.pump()

	// A reconnect racing with this call may already have registered the
	// watch (it is in c.watches): EEXIST then means success.
	_, err := c.do(ctx, nil, typeWatch, 0, "watch", path, path, "\x00", w.wireToken, "\x00")
	if err != nil && !errors.Is(err, unix.EEXIST) {
		c.forget(w)
		w.stop()
		return nil, err
	}
	return w, nil
}

func (c *Client) forget(w *Watch) {
	c.watchMu.Lock()
	delete(c.watches, w.wireToken)
	c.watchMu.Unlock()
}

// Events returns the channel of the watch's events; it is closed by Close.
func (w *Watch) Events() <-chan Event { return w.events }

// Path returns the path the watch was registered on.
func (w *Watch) Path() string { return w.path }

// Close unregisters the watch and closes its channel; undelivered events are
// dropped. If the connection is down, the watch is only forgotten locally.
func (w *Watch) Close(ctx context.Context) error {
	w.c.forget(w)
	w.stop()
	w.c.mu.Lock()
	cn, closed := w.c.conn, w.c.closed
	w.c.mu.Unlock()
	if closed || cn == nil || !cn.alive() {
		return nil
	}
	_, err := w.c.do(ctx, cn, typeUnwatch, 0, "unwatch", w.path, w.path, "\x00", w.wireToken, "\x00")
	if errors.Is(err, ErrConnectionLost) || errors.Is(err, ErrClosed) {
		return nil // the daemon forgets watches of dead connections
	}
	return err
}

func (w *Watch) push(ev Event) {
	w.mu.Lock()
	if w.stopped {
		w.mu.Unlock()
		return
	}
	w.queue = append(w.queue, ev)
	w.pushed++
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *Watch) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.stopped {
		w.stopped = true
		w.queue = nil
		close(w.done)
	}
}

// pump moves queued events to the unbuffered events channel, so a slow
// consumer never blocks the connection's reader.
func (w *Watch) pump() {
	defer close(w.events)
	for {
		select {
		case <-w.wake:
		case <-w.done:
			return
		}
		for {
			w.mu.Lock()
			if len(w.queue) == 0 {
				w.queue = w.queue[:0]
				w.mu.Unlock()
				break
			}
			ev := w.queue[0]
			w.queue[0] = Event{}
			w.queue = w.queue[1:]
			w.mu.Unlock()
			select {
			case w.events <- ev:
			case <-w.done:
				return
			}
		}
	}
}
