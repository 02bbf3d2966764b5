package sanlock

import (
	"context"
	"net"
	"sync"
)

// Process is a registered connection: the leases it acquires belong to the
// calling process. Closing it (or the process exiting) releases them, except
// persistent ones, which sanlock keeps as orphans for the next registered
// process to adopt (AcquireOrphan) or release (ReleaseOrphan).
type Process struct {
	mu   sync.Mutex // one request in flight on conn: replies come in order but carry no id
	conn *net.UnixConn
}

// Register connects to the daemon and registers the calling process.
func (c Client) Register(ctx context.Context) (*Process, error) {
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, &Error{Op: "register", Err: err}
	}
	// register has no reply: the connection now stands for this process.
	if err := send(conn, cmdRegister, 0, 0, 0, nil); err != nil {
		conn.Close()
		return nil, &Error{Op: "register", Err: err}
	}
	return &Process{conn: conn}, nil
}

// Close closes the registered connection: sanlock releases the process's
// leases and keeps the persistent ones as orphans.
func (p *Process) Close() error { return p.conn.Close() }

func (p *Process) do(ctx context.Context, op string, cmd, flags, data uint32, body []byte) (header, []byte, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return roundTrip(ctx, p.conn, op, cmd, flags, data, pidSelf, body)
}

// Restrict limits what sanlock may do to the process when its lockspace
// fails (RestrictSigkill, RestrictSigterm).
func (p *Process) Restrict(ctx context.Context, flags uint32) error {
	_, _, err := p.do(ctx, "restrict", cmdRestrict, flags, 0, nil)
	return err
}

// Acquire acquires one resource lease for the process: exclusive, or shared
// with r.Flags&ResShared; persistent with ResPersistent. ownerName (up to
// NameLen bytes) is recorded by sanlock for its status output.
func (p *Process) Acquire(ctx context.Context, r Resource, flags uint32, ownerName string) error {
	res, err := r.marshal(true)
	if err != nil {
		return &Error{Op: "acquire", Err: err}
	}
	opt := make([]byte, optionsSize)
	if err := putName(opt[:NameLen], ownerName); err != nil {
		return &Error{Op: "acquire " + r.Name, Err: err}
	}
	_, _, err = p.do(ctx, "acquire "+r.Name, cmdAcquire, flags, 1, append(res, opt...))
	return err
}

// Release releases one resource lease of the process. With ReleaseOrphan it
// releases the orphan of r.Name instead (every orphan of the lockspace when
// r.Name is empty), asynchronously.
func (p *Process) Release(ctx context.Context, r Resource, flags uint32) error {
	res, err := r.marshal(false)
	if err != nil {
		return &Error{Op: "release", Err: err}
	}
	_, _, err = p.do(ctx, "release "+r.Name, cmdRelease, flags, 1, res)
	return err
}

// Convert changes a held lease between shared and exclusive (r.Flags &
// ResShared is the mode wanted); flags may hold AcquireOwnerNoWait.
func (p *Process) Convert(ctx context.Context, r Resource, flags uint32) error {
	res, err := r.marshal(false)
	if err != nil {
		return &Error{Op: "convert", Err: err}
	}
	_, _, err = p.do(ctx, "convert "+r.Name, cmdConvert, flags, 0, res)
	return err
}

// Inquire returns the process's leases in sanlock's state string form
// ("LS:NAME:PATH:OFFSET:LVER ...") and how many there are.
func (p *Process) Inquire(ctx context.Context) (string, int, error) {
	h, rest, err := p.do(ctx, "inquire", cmdInquire, 0, 0, nil)
	if err != nil {
		return "", 0, err
	}
	if i := indexNUL(rest); i >= 0 {
		rest = rest[:i]
	}
	return string(rest), int(h.data2), nil
}

func indexNUL(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return -1
}
