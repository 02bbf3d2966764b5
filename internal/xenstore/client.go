// Package xenstore is a client for the XenStore wire protocol (unix socket of
// xenstored, or /dev/xen/xenbus). It knows nothing of Xen policy.
//
// CONTRACT SKELETON: the exported API below is what the rest of xenblkd codes
// against. Implementations may add to it but must keep these signatures.
package xenstore

import (
	"context"
	"errors"
)

// Errors: replies of type XS_ERROR map to an *Error whose Err is the matching
// syscall.Errno (ENOENT, EACCES, EAGAIN, EINVAL, E2BIG, EQUOTA→EDQUOT, ...), so
// errors.Is(err, unix.ENOENT) and errors.Is(err, fs.ErrNotExist) work.
type Error struct {
	Op   string // "read", "write", ...
	Path string
	Err  error
}

func (e *Error) Error() string { return "xenstore " + e.Op + " " + e.Path + ": " + e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// ErrClosed: the client was closed. ErrConnectionLost: the connection broke
// while the request was in flight (the request may or may not have happened).
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

// Client is one connection to XenStore, safe for concurrent use; it reconnects
// after xenstored restarts and re-registers its watches.
type Client struct{}

// Dial connects to $XENSTORED_PATH, else /run/xenstored/socket,
// /var/run/xenstored/socket, else /dev/xen/xenbus.
func Dial(ctx context.Context) (*Client, error) { panic("TODO") }

// DialUnix connects to the xenstored unix socket at path.
func DialUnix(ctx context.Context, path string) (*Client, error) { panic("TODO") }

// OpenXenbus opens the kernel's xenbus device (usually /dev/xen/xenbus).
func OpenXenbus(ctx context.Context, path string) (*Client, error) { panic("TODO") }

func (c *Client) Close() error { panic("TODO") }

func (c *Client) Read(ctx context.Context, path string) (string, error)         { panic("TODO") }
func (c *Client) Write(ctx context.Context, path, value string) error           { panic("TODO") }
func (c *Client) Mkdir(ctx context.Context, path string) error                  { panic("TODO") }
func (c *Client) Rm(ctx context.Context, path string) error                     { panic("TODO") }
func (c *Client) Directory(ctx context.Context, path string) ([]string, error)  { panic("TODO") }
func (c *Client) GetPerms(ctx context.Context, path string) ([]Perm, error)     { panic("TODO") }
func (c *Client) SetPerms(ctx context.Context, path string, perms []Perm) error { panic("TODO") }

// Tx is an open transaction; it implements Ops.
type Tx struct{}

func (c *Client) Begin(ctx context.Context) (*Tx, error) { panic("TODO") }

// Commit ends the transaction; a conflict returns an error matching unix.EAGAIN.
func (t *Tx) Commit(ctx context.Context) error { panic("TODO") }
func (t *Tx) Abort(ctx context.Context) error  { panic("TODO") }

func (t *Tx) Read(ctx context.Context, path string) (string, error)         { panic("TODO") }
func (t *Tx) Write(ctx context.Context, path, value string) error           { panic("TODO") }
func (t *Tx) Mkdir(ctx context.Context, path string) error                  { panic("TODO") }
func (t *Tx) Rm(ctx context.Context, path string) error                     { panic("TODO") }
func (t *Tx) Directory(ctx context.Context, path string) ([]string, error)  { panic("TODO") }
func (t *Tx) GetPerms(ctx context.Context, path string) ([]Perm, error)     { panic("TODO") }
func (t *Tx) SetPerms(ctx context.Context, path string, perms []Perm) error { panic("TODO") }

// Transaction runs fn in a transaction and commits it, retrying the whole thing
// (bounded, with backoff) when the commit reports EAGAIN. fn must be idempotent.
func (c *Client) Transaction(ctx context.Context, fn func(tx *Tx) error) error { panic("TODO") }

// Event is one watch firing: the path that changed (in the form the watch was
// registered) and the watch's token.
type Event struct {
	Path  string
	Token string
}

// Watch is a registered watch. Events are delivered in order, without loss
// (the queue is unbounded), including the initial event XS_WATCH fires.
type Watch struct{}

func (c *Client) Watch(ctx context.Context, path, token string) (*Watch, error) { panic("TODO") }
func (w *Watch) Events() <-chan Event                                           { panic("TODO") }
func (w *Watch) Close(ctx context.Context) error                                { panic("TODO") }
