// Package xenstoretest is an in-memory XenStore server speaking the wire
// protocol on a unix socket, for fast unit tests of code that uses
// internal/xenstore. It is a fake, not a model of xenstored: every client is
// dom0, permissions are stored but not enforced, there are no quotas, and a
// transaction conflicts if anything it touched changed since it started.
// Contract tests run the same suite against it and the real daemons.
//
// It deliberately does not import internal/xenstore: the wire format is
// written out again here, so a bug in the client's codec is not mirrored.
package xenstoretest

import (
	"bytes"
	"encoding/binary"
	"hash/fnv"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// Wire message types (xen/io/xs_wire.h).
const (
	xsDirectory        = 1
	xsRead             = 2
	xsGetPerms         = 3
	xsWatch            = 4
	xsUnwatch          = 5
	xsTransactionStart = 6
	xsTransactionEnd   = 7
	xsGetDomainPath    = 10
	xsWrite            = 11
	xsMkdir            = 12
	xsRm               = 13
	xsSetPerms         = 14
	xsWatchEvent       = 15
	xsError            = 16
	xsDirectoryPart    = 22

	maxPayload = 4096
	home       = "/local/domain/0" // where relative paths of dom0 resolve
)

// Options change the server's behaviour.
type Options struct {
	// EventsBeforeReply sends the watch events a request triggers on its own
	// connection before the reply to it, as C xenstored does (oxenstored,
	// and the default here, send the reply first).
	EventsBeforeReply bool
}

// Server is a fake xenstored listening on Socket.
type Server struct {
	Socket string // unix socket path; point clients here (XENSTORED_PATH)

	opts Options

	mu      sync.Mutex // guards everything below, and orders all writes to clients
	ln      net.Listener
	frozen  bool
	unfreez *sync.Cond
	store   store
	gen     uint64            // bumped by every change of the live store
	changed map[string]uint64 // path → gen of its last change (also removals)
	conns   map[*conn]bool
	nextTx  uint32
	fired   []fired // changes not yet turned into watch events
}

type node struct {
	value string
	perms []string // "n0", "r5", ...
}

// store maps absolute paths to nodes; "/" always exists.
type store map[string]*node

type watch struct{ path, token string }

type tx struct {
	store    store
	startGen uint64
	touched  map[string]bool
	log      []func(s *Server) // replayed on the live store at commit
}

type conn struct {
	nc      net.Conn
	watches []watch
	txs     map[uint32]*tx
}

// NewServer starts a fake on a socket in a fresh temporary directory; it is
// stopped and removed by tb.Cleanup.
func NewServer(tb testing.TB, opts Options) *Server {
	tb.Helper()
	// os.MkdirTemp, not tb.TempDir: socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "xsfake-")
	if err != nil {
		tb.Fatalf("xenstoretest: %v", err)
	}
	s := &Server{Socket: filepath.Join(dir, "socket"), opts: opts}
	s.unfreez = sync.NewCond(&s.mu)
	tb.Cleanup(func() {
		s.Kill()
		os.RemoveAll(dir)
	})
	if err := s.Restart(); err != nil {
		tb.Fatalf("xenstoretest: %v", err)
	}
	return s
}

// Restart starts serving again on the same socket with a fresh store that
// holds only "/" and /local/domain/0, like a restarted xenstored.
func (s *Server) Restart() error {
	s.Kill()
	os.Remove(s.Socket)
	ln, err := net.Listen("unix", s.Socket)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.ln = ln
	s.frozen = false
	s.store = store{"/": {perms: []string{"n0"}}}
	s.gen = 1
	s.changed = map[string]uint64{}
	s.conns = map[*conn]bool{}
	s.store.write("/local/domain/0", "")
	s.mu.Unlock()
	go s.accept(ln)
	return nil
}

// Kill stops listening and drops every connection, like a killed xenstored.
func (s *Server) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ln != nil {
		s.ln.Close()
		s.ln = nil
	}
	for c := range s.conns {
		c.nc.Close()
	}
	s.conns = nil
	s.frozen = false
	s.unfreez.Broadcast()
}

// Freeze makes the server stop answering (requests are read but not
// processed) until Kill or Restart, like a SIGSTOPped xenstored.
func (s *Server) Freeze() {
	s.mu.Lock()
	s.frozen = true
	s.mu.Unlock()
}

func (s *Server) accept(ln net.Listener) {
	for {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		c := &conn{nc: nc, txs: map[uint32]*tx{}}
		s.mu.Lock()
		if s.ln != ln {
			s.mu.Unlock()
			nc.Close()
			return
		}
		s.conns[c] = true
		s.mu.Unlock()
		go s.serve(c)
	}
}

func (s *Server) serve(c *conn) {
	defer c.nc.Close()
	var hdr [16]byte
	for {
		if _, err := io.ReadFull(c.nc, hdr[:]); err != nil {
			return
		}
		typ := binary.LittleEndian.Uint32(hdr[0:])
		reqID := binary.LittleEndian.Uint32(hdr[4:])
		txID := binary.LittleEndian.Uint32(hdr[8:])
		n := binary.LittleEndian.Uint32(hdr[12:])
		if n > maxPayload {
			return // xenstored drops such connections
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(c.nc, payload); err != nil {
			return
		}
		s.mu.Lock()
		for s.frozen {
			s.unfreez.Wait()
		}
		if s.conns == nil || !s.conns[c] {
			s.mu.Unlock()
			return
		}
		s.handle(c, typ, reqID, txID, payload)
		s.mu.Unlock()
	}
}

// handle runs one request; s.mu is held.
func (s *Server) handle(c *conn, typ, reqID, txID uint32, payload []byte) {
	var events pending
	reply, errName := s.exec(c, typ, txID, payload, &events)
	own := events.m[c]
	delete(events.m, c)
	if errName != "" {
		typ, reply = xsError, []byte(errName+"\x00")
	}
	if s.opts.EventsBeforeReply {
		send(c, own...)
		send(c, frame(typ, reqID, txID, reply))
	} else {
		send(c, frame(typ, reqID, txID, reply))
		send(c, own...)
	}
	send(c, events.after...)
	for other, evs := range events.m {
		send(other, evs...)
	}
}

func send(c *conn, msgs ...[]byte) {
	for _, m := range msgs {
		if _, err := c.nc.Write(m); err != nil {
			c.nc.Close()
			return
		}
	}
}

func frame(typ, reqID, txID uint32, payload []byte) []byte {
	b := make([]byte, 16, 16+len(payload))
	binary.LittleEndian.PutUint32(b[0:], typ)
	binary.LittleEndian.PutUint32(b[4:], reqID)
	binary.LittleEndian.PutUint32(b[8:], txID)
	binary.LittleEndian.PutUint32(b[12:], uint32(len(payload)))
	return append(b, payload...)
}

// abs resolves a request path: relative paths are under dom0's home.
func abs(p string) (string, bool) {
	if p == "" || strings.Contains(p, "//") || (len(p) > 1 && strings.HasSuffix(p, "/")) {
		return "", false
	}
	if !strings.HasPrefix(p, "/") {
		p = home + "/" + p
	}
	return p, true
}

func parent(p string) string {
	i := strings.LastIndexByte(p, '/')
	if i <= 0 {
		return "/"
	}
	return p[:i]
}

// args splits a NUL-separated payload; a trailing NUL ends the last field.
func args(p []byte) []string {
	return strings.Split(strings.TrimSuffix(string(p), "\x00"), "\x00")
}

// exec applies one request and returns the reply payload or an error name.
func (s *Server) exec(c *conn, typ, txID uint32, payload []byte, events *pending) ([]byte, string) {
	var t *tx
	if txID != 0 {
		if t = c.txs[txID]; t == nil {
			return nil, "ENOENT"
		}
	}
	switch typ {
	case xsTransactionStart:
		if t != nil {
			return nil, "EBUSY"
		}
		s.nextTx++
		id := s.nextTx
		c.txs[id] = &tx{store: s.store.clone(), startGen: s.gen, touched: map[string]bool{}}
		return []byte(strconv.FormatUint(uint64(id), 10) + "\x00"), ""
	case xsTransactionEnd:
		if t == nil {
			return nil, "ENOENT"
		}
		delete(c.txs, txID)
		if a := args(payload); a[0] != "T" {
			return []byte("OK\x00"), "" // abort
		}
		for p := range t.touched {
			if s.changed[p] > t.startGen {
				return nil, "EAGAIN"
			}
		}
		for _, apply := range t.log {
			apply(s)
		}
		s.flush(events)
		return []byte("OK\x00"), ""
	case xsWatch, xsUnwatch:
		a := args(payload)
		if len(a) < 2 {
			return nil, "EINVAL"
		}
		w := watch{path: a[0], token: a[1]}
		if !strings.HasPrefix(w.path, "@") {
			if _, ok := abs(w.path); !ok {
				return nil, "EINVAL"
			}
		}
		i := slices.Index(c.watches, w)
		if typ == xsUnwatch {
			if i < 0 {
				return nil, "ENOENT"
			}
			c.watches = slices.Delete(c.watches, i, i+1)
			return []byte("OK\x00"), ""
		}
		if i >= 0 {
			return nil, "EEXIST"
		}
		c.watches = append(c.watches, w)
		// The initial event follows the OK on the wire for both daemons.
		events.after = append(events.after, frame(xsWatchEvent, 0, 0, []byte(w.path+"\x00"+w.token+"\x00")))
		return []byte("OK\x00"), ""
	case xsGetDomainPath:
		a := args(payload)
		if _, err := strconv.ParseUint(a[0], 10, 16); err != nil {
			return nil, "EINVAL"
		}
		return []byte("/local/domain/" + a[0] + "\x00"), ""
	}

	a := args(payload)
	if typ == xsWrite {
		// WRITE is "path\0value": the value may itself contain NULs.
		i := bytes.IndexByte(payload, 0)
		if i < 0 {
			return nil, "EINVAL"
		}
		a = []string{string(payload[:i]), string(payload[i+1:])}
	}
	p, ok := abs(a[0])
	if !ok {
		return nil, "EINVAL"
	}
	st := s.store
	if t != nil {
		st = t.store
		t.touched[p] = true
		t.touched[parent(p)] = true
	}
	switch typ {
	case xsRead:
		n := st[p]
		if n == nil {
			return nil, "ENOENT"
		}
		return []byte(n.value), ""
	case xsDirectory, xsDirectoryPart:
		if st[p] == nil {
			return nil, "ENOENT"
		}
		var b []byte
		for _, name := range st.children(p) {
			b = append(append(b, name...), 0)
		}
		if typ == xsDirectory {
			if len(b) > maxPayload {
				return nil, "E2BIG" // as C xenstored: the client lists in parts
			}
			return b, ""
		}
		return directoryPart(b, a)
	case xsGetPerms:
		n := st[p]
		if n == nil {
			return nil, "ENOENT"
		}
		var b []byte
		for _, perm := range n.perms {
			b = append(append(b, perm...), 0)
		}
		return b, ""
	}

	// Changes: apply now (live) or in the transaction's copy and its log.
	var change func(st store) ([]string, string)
	switch typ {
	case xsWrite:
		v := a[1]
		change = func(st store) ([]string, string) { return st.write(p, v), "" }
	case xsMkdir:
		change = func(st store) ([]string, string) {
			if st[p] != nil {
				return nil, ""
			}
			return st.write(p, ""), ""
		}
	case xsRm:
		change = func(st store) ([]string, string) { return st.rm(p) }
	case xsSetPerms:
		perms := a[1:]
		if len(perms) == 0 {
			return nil, "EINVAL"
		}
		for _, perm := range perms {
			if len(perm) < 2 || !strings.ContainsRune("nrwb", rune(perm[0])) {
				return nil, "EINVAL"
			}
			if _, err := strconv.ParseUint(perm[1:], 10, 16); err != nil {
				return nil, "EINVAL"
			}
		}
		change = func(st store) ([]string, string) {
			n := st[p]
			if n == nil {
				return nil, "ENOENT"
			}
			n.perms = slices.Clone(perms)
			return []string{p}, ""
		}
	default:
		return nil, "EINVAL"
	}
	if t != nil {
		changed, errName := change(t.store)
		if errName != "" {
			return nil, errName
		}
		for _, q := range changed {
			t.touched[q] = true
		}
		t.log = append(t.log, func(s *Server) {
			changed, _ := change(s.store)
			s.note(changed, p, typ == xsRm)
		})
		return []byte("OK\x00"), ""
	}
	changed, errName := change(s.store)
	if errName != "" {
		return nil, errName
	}
	s.note(changed, p, typ == xsRm)
	s.flush(events)
	return []byte("OK\x00"), ""
}

// note records a change of the live store: generations for conflict
// detection and the paths whose watches fire at the next flush.
func (s *Server) note(changed []string, p string, removed bool) {
	if len(changed) == 0 {
		return
	}
	s.gen++
	for _, q := range changed {
		s.changed[q] = s.gen
	}
	s.fired = append(s.fired, fired{path: p, removed: removed})
}

// flush turns the changes noted since the last flush into watch events.
func (s *Server) flush(events *pending) {
	for _, f := range s.fired {
		for c := range s.conns {
			for _, w := range c.watches {
				if strings.HasPrefix(w.path, "@") {
					continue
				}
				wp, _ := abs(w.path)
				var evPath string
				switch {
				case under(f.path, wp):
					evPath = f.path
					if !strings.HasPrefix(w.path, "/") {
						evPath = strings.TrimPrefix(evPath, home+"/")
					}
				case f.removed && under(wp, f.path):
					evPath = w.path
				default:
					continue
				}
				events.add(c, frame(xsWatchEvent, 0, 0, []byte(evPath+"\x00"+w.token+"\x00")))
			}
		}
	}
	s.fired = s.fired[:0]
}

// under reports whether p is dir or below it.
func under(p, dir string) bool {
	return p == dir || dir == "/" || strings.HasPrefix(p, dir+"/")
}

func (st store) clone() store {
	c := make(store, len(st))
	for p, n := range st {
		cp := *n
		c[p] = &cp
	}
	return c
}

// write sets p (creating missing ancestors with their parent's permissions)
// and returns the paths whose content or children changed.
func (st store) write(p, v string) []string {
	changed := []string{p}
	if n := st[p]; n != nil {
		n.value = v
		return changed
	}
	var missing []string
	q := p
	for st[q] == nil {
		missing = append(missing, q)
		q = parent(q)
	}
	changed = append(changed, q) // the existing ancestor gains a child
	for i := len(missing) - 1; i >= 0; i-- {
		perms := st[parent(missing[i])].perms
		st[missing[i]] = &node{perms: slices.Clone(perms)}
		changed = append(changed, missing[i])
	}
	st[p].value = v
	return changed
}

// rm removes p and its subtree. Removing a missing node whose parent exists
// succeeds, as in C xenstored.
func (st store) rm(p string) ([]string, string) {
	if p == "/" {
		return nil, "EINVAL"
	}
	if st[p] == nil {
		if st[parent(p)] != nil {
			return nil, ""
		}
		return nil, "ENOENT"
	}
	changed := []string{parent(p)}
	for q := range st {
		if under(q, p) {
			delete(st, q)
			changed = append(changed, q)
		}
	}
	return changed, ""
}

// children returns the sorted names of p's children.
func (st store) children(p string) []string {
	prefix := p + "/"
	if p == "/" {
		prefix = "/"
	}
	var names []string
	for q := range st {
		if q != "/" && strings.HasPrefix(q, prefix) && !strings.Contains(q[len(prefix):], "/") {
			names = append(names, q[len(prefix):])
		}
	}
	slices.Sort(names)
	return names
}

// pending collects the watch events of one request per connection; after
// holds events for the requesting connection that always follow its reply
// (the initial event of XS_WATCH).
type pending struct {
	m     map[*conn][][]byte
	after [][]byte
}

func (e *pending) add(c *conn, msg []byte) {
	if e.m == nil {
		e.m = map[*conn][][]byte{}
	}
	e.m[c] = append(e.m[c], msg)
}

type fired struct {
	path    string
	removed bool
}

// Thaw undoes Freeze: requests read meanwhile are answered in order.
func (s *Server) Thaw() {
	s.mu.Lock()
	s.frozen = false
	s.unfreez.Broadcast()
	s.mu.Unlock()
}

// directoryPart answers DIRECTORY_PART "path\0offset\0" from the whole list
// b: the generation (here a hash of the list, which changes when it does),
// then the names from offset that fit; the last part ends with an empty name.
func directoryPart(b []byte, a []string) ([]byte, string) {
	if len(a) < 2 {
		return nil, "EINVAL"
	}
	off, err := strconv.Atoi(a[1])
	if err != nil || off < 0 || off > len(b) {
		return nil, "EINVAL"
	}
	h := fnv.New64a()
	h.Write(b)
	reply := append(strconv.AppendUint(nil, h.Sum64(), 10), 0)
	room := maxPayload - len(reply) - 1
	rest := b[off:]
	if len(rest) <= room {
		return append(append(reply, rest...), 0), ""
	}
	// Whole names only: cut after the last NUL that fits.
	cut := bytes.LastIndexByte(rest[:room], 0) + 1
	return append(reply, rest[:cut]...), ""
}
