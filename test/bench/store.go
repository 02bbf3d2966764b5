package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"xenblkd/internal/xenstore"
)

// store is the little the bench needs from XenStore. Node setup and cleanup
// are untimed, so any correct client will do.
type store interface {
	// WriteTx writes all pairs in one transaction (as libxl does).
	WriteTx(ctx context.Context, kv [][2]string) error
	Read(ctx context.Context, path string) (string, error)
	Rm(ctx context.Context, path string) error
	Close() error
}

// dialStore connects with the project's client, falling back to a minimal
// synchronous wire client while internal/xenstore is still a skeleton
// (its methods panic "TODO").
func dialStore(ctx context.Context, socket string) (s store, which string, err error) {
	if c, err := dialProject(ctx, socket); err == nil {
		return c, "xenblkd/internal/xenstore", nil
	}
	w, err := dialWire(socket)
	if err != nil {
		return nil, "", err
	}
	return w, "test/bench stopgap wire client (internal/xenstore not usable yet)", nil
}

type projectStore struct{ c *xenstore.Client }

func dialProject(ctx context.Context, socket string) (s *projectStore, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("internal/xenstore: %v", r)
		}
	}()
	c, err := xenstore.DialUnix(ctx, socket)
	if err != nil {
		return nil, err
	}
	s = &projectStore{c}
	// Probe a round trip: a skeleton may dial but not serve.
	if err := s.WriteTx(ctx, [][2]string{{"/local/domain/0/xenblkd-bench-probe", "1"}}); err != nil {
		c.Close()
		return nil, err
	}
	if err := s.Rm(ctx, "/local/domain/0/xenblkd-bench-probe"); err != nil {
		c.Close()
		return nil, err
	}
	return s, nil
}

func (p *projectStore) WriteTx(ctx context.Context, kv [][2]string) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("internal/xenstore: %v", r)
		}
	}()
	return p.c.Transaction(ctx, func(tx *xenstore.Tx) error {
		for _, e := range kv {
			if err := tx.Write(ctx, e[0], e[1]); err != nil {
				return err
			}
		}
		return nil
	})
}
func (p *projectStore) Read(ctx context.Context, path string) (string, error) {
	return p.c.Read(ctx, path)
}
func (p *projectStore) Rm(ctx context.Context, path string) error {
	err := p.c.Rm(ctx, path)
	if isNotExist(err) {
		return nil
	}
	return err
}
func (p *projectStore) Close() error { return p.c.Close() }

func isNotExist(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "ENOENT") || strings.Contains(err.Error(), "no such file"))
}

// wireStore: one connection, one request at a time, no watches (so every
// message read is the reply to the request just sent).
type wireStore struct {
	mu    sync.Mutex
	conn  net.Conn
	reqID uint32
}

const (
	xsRead     = 2
	xsTxStart  = 6
	xsTxEnd    = 7
	xsWrite    = 11
	xsRm       = 13
	xsError    = 16
	xsWatchEvt = 15
)

func dialWire(socket string) (*wireStore, error) {
	c, err := net.DialTimeout("unix", socket, 5*time.Second)
	if err != nil {
		return nil, err
	}
	return &wireStore{conn: c}, nil
}

func (w *wireStore) call(typ, tx uint32, payload string) (string, error) {
	w.reqID++
	hdr := make([]byte, 16, 16+len(payload))
	binary.LittleEndian.PutUint32(hdr[0:], typ)
	binary.LittleEndian.PutUint32(hdr[4:], w.reqID)
	binary.LittleEndian.PutUint32(hdr[8:], tx)
	binary.LittleEndian.PutUint32(hdr[12:], uint32(len(payload)))
	if _, err := w.conn.Write(append(hdr, payload...)); err != nil {
		return "", err
	}
	for {
		var rh [16]byte
		if _, err := io.ReadFull(w.conn, rh[:]); err != nil {
			return "", err
		}
		body := make([]byte, binary.LittleEndian.Uint32(rh[12:]))
		if _, err := io.ReadFull(w.conn, body); err != nil {
			return "", err
		}
		rt := binary.LittleEndian.Uint32(rh[0:])
		if rt == xsWatchEvt {
			continue
		}
		if rt == xsError {
			return "", errors.New(strings.TrimRight(string(body), "\x00"))
		}
		return string(body), nil
	}
}

func (w *wireStore) WriteTx(ctx context.Context, kv [][2]string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for attempt := 0; ; attempt++ {
		id, err := w.call(xsTxStart, 0, "\x00")
		if err != nil {
			return fmt.Errorf("transaction start: %w", err)
		}
		tx, err := strconv.ParseUint(strings.TrimRight(id, "\x00"), 10, 32)
		if err != nil {
			return fmt.Errorf("transaction id %q: %w", id, err)
		}
		for _, e := range kv {
			if _, err := w.call(xsWrite, uint32(tx), e[0]+"\x00"+e[1]); err != nil {
				w.call(xsTxEnd, uint32(tx), "F\x00")
				return fmt.Errorf("write %s: %w", e[0], err)
			}
		}
		_, err = w.call(xsTxEnd, uint32(tx), "T\x00")
		if err != nil && err.Error() == "EAGAIN" && attempt < 20 {
			continue
		}
		return err
	}
}

func (w *wireStore) Read(ctx context.Context, path string) (string, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.call(xsRead, 0, path+"\x00")
}

func (w *wireStore) Rm(ctx context.Context, path string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	_, err := w.call(xsRm, 0, path+"\x00")
	if err != nil && err.Error() == "ENOENT" {
		return nil
	}
	return err
}

func (w *wireStore) Close() error { return w.conn.Close() }
