package xenstore

import (
	"context"
	"errors"

	"golang.org/x/sys/unix"
)

// OpType is the kind of one operation of a batch.
type OpType uint8

const (
	OpRead      OpType = iota + 1 // Reply.Value
	OpWrite                       // Op.Value is written
	OpRm                          // the node and everything below it
	OpDirectory                   // Reply.Names
	OpGetPerms                    // Reply.Perms
)

// Op is one operation of a batch.
type Op struct {
	Type  OpType
	Path  string
	Value string // OpWrite only
}

// Read, Write, Rm, Directory and GetPerms build the Op of that name.
func Read(path string) Op         { return Op{Type: OpRead, Path: path} }
func Write(path, value string) Op { return Op{Type: OpWrite, Path: path, Value: value} }
func Rm(path string) Op           { return Op{Type: OpRm, Path: path} }
func Directory(path string) Op    { return Op{Type: OpDirectory, Path: path} }
func GetPerms(path string) Op     { return Op{Type: OpGetPerms, Path: path} }

func (o Op) request() (r request) {
	switch o.Type {
	case OpRead:
		return request{typ: typeRead, op: "read", path: o.Path, args: []string{o.Path, "\x00"}}
	case OpWrite:
		return request{typ: typeWrite, op: "write", path: o.Path, args: []string{o.Path, "\x00", o.Value}}
	case OpRm:
		return request{typ: typeRm, op: "rm", path: o.Path, args: []string{o.Path, "\x00"}}
	case OpDirectory:
		return request{typ: typeDirectory, op: "directory", path: o.Path, args: []string{o.Path, "\x00"}}
	case OpGetPerms:
		return request{typ: typeGetPerms, op: "get-perms", path: o.Path, args: []string{o.Path, "\x00"}}
	}
	return request{op: "batch", path: o.Path, err: &Error{Op: "batch", Path: o.Path, Err: unix.EINVAL}}
}

// Reply is the outcome of one Op.
type Reply struct {
	Value string   // OpRead
	Names []string // OpDirectory
	Perms []Perm   // OpGetPerms
	Err   error    // as the single call of that name would return it
}

// Batch sends ops back to back (one write) and then collects their replies,
// in order: N operations cost one round trip, without a goroutine each.
// xenstored handles one connection's requests in order, so a write in a batch
// is seen by the reads after it.
func (c *Client) Batch(ctx context.Context, ops []Op) []Reply {
	return batch(ctx, c, nil, 0, ops)
}

// Batch runs ops inside the transaction, as Client.Batch does.
func (t *Tx) Batch(ctx context.Context, ops []Op) []Reply {
	return batch(ctx, t.o.c, t.o.pin, t.o.txID, ops)
}

func batch(ctx context.Context, c *Client, pin *conn, txID uint32, list []Op) []Reply {
	out := make([]Reply, len(list))
	if len(list) == 0 {
		return out
	}
	reqs := make([]request, len(list))
	ptrs := make([]*request, len(list))
	for i, o := range list {
		reqs[i] = o.request()
		ptrs[i] = &reqs[i]
	}
	c.send(ctx, pin, txID, ptrs) // a failure is in each request's err
	o := ops{c: c, pin: pin, txID: txID}
	for i := range reqs {
		p, err := reqs[i].wait(ctx)
		out[i] = reply(ctx, list[i], o, p, err)
	}
	return out
}

// reply decodes one payload as the single call of op's type would.
func reply(ctx context.Context, op Op, o ops, p []byte, err error) Reply {
	if op.Type == OpDirectory && errors.Is(err, unix.E2BIG) {
		// The names do not fit one 4096-byte reply: list them in parts.
		names, err := o.directoryParts(ctx, op.Path)
		return Reply{Names: names, Err: err}
	}
	if err != nil {
		return Reply{Err: err}
	}
	switch op.Type {
	case OpRead:
		return Reply{Value: string(p)}
	case OpDirectory:
		return Reply{Names: parseDirectory(p)}
	case OpGetPerms:
		perms, err := parsePerms(p)
		if err != nil {
			return Reply{Err: &Error{Op: "get-perms", Path: op.Path, Err: err}}
		}
		return Reply{Perms: perms}
	}
	return Reply{}
}
