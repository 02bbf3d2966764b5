package hotplug

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"xenblkd/internal/text"
	"xenblkd/internal/xenstore"
)

// ToolstackDomid is the domain whose nodes are trusted to say which VM a
// domain belongs to: the toolstack (libxl) runs in dom0.
const ToolstackDomid = 0

// Frontend is what the toolstack says about a frontend domain, for the
// same-VM and stub-domain sharing exceptions. Each value is read only from a
// node whose permissions let no one but the toolstack write it; a missing
// node, an unreadable one or one a guest could write leaves its value "" (and
// a line in Ignored or Unreadable), so it can never widen sharing.
type Frontend struct {
	VM         string   // /local/domain/<domid>/vm
	Target     int      // a device-model stub domain: the domain it serves (/local/domain/<domid>/target); -1 if none
	TargetVM   string   // /local/domain/<Target>/vm
	Ignored    []string // nodes that exist but were not trusted, and why
	Unreadable []string // nodes that could not be read (e.g. EACCES in a driver domain), and why
}

// ReadFrontend reads domid's vm and target nodes with their permissions in
// one batch, then, for a stub domain, the target's vm (a second batch). The
// daemon reads it only when a sharing conflict may be excused by it.
func ReadFrontend(ctx context.Context, s Batcher, domid uint32) Frontend {
	fe := Frontend{Target: -1}
	dom := fmt.Sprintf("/local/domain/%d", domid)
	got := readTrusted(ctx, s, dom+"/vm", dom+"/target")
	fe.VM = got[0].value
	fe.note(got[0])
	fe.note(got[1])
	target := got[1].value
	if target == "" {
		return fe
	}
	t, err := parseID(target, 0x7fef)
	if err != nil || t == uint64(domid) {
		fe.note(trusted{why: fmt.Sprintf("%s/target: %q is not another domain's id", dom, text.Truncate(target, 64))})
		return fe
	}
	fe.Target = int(t)
	tvm := readTrusted(ctx, s, fmt.Sprintf("/local/domain/%d/vm", t))[0]
	fe.TargetVM = tvm.value
	fe.note(tvm)
	return fe
}

func (fe *Frontend) note(t trusted) {
	switch {
	case t.why == "":
	case t.readErr:
		fe.Unreadable = append(fe.Unreadable, t.why)
	default:
		fe.Ignored = append(fe.Ignored, t.why)
	}
}

// trusted is a node's value if only the toolstack can write it ("" and why
// not otherwise, readErr if the node could not be read; "" and "" if the node
// is simply missing).
type trusted struct {
	value, why string
	readErr    bool
}

// readTrusted reads each path and its permissions, in one batch.
func readTrusted(ctx context.Context, s Batcher, paths ...string) []trusted {
	var ops []xenstore.Op
	for _, p := range paths {
		ops = append(ops, xenstore.Read(p), xenstore.GetPerms(p))
	}
	replies := s.Batch(ctx, ops)
	out := make([]trusted, len(paths))
	for i, path := range paths {
		v, rerr := replies[2*i].Value, replies[2*i].Err
		perms, perr := replies[2*i+1].Perms, replies[2*i+1].Err
		switch {
		case errors.Is(rerr, unix.ENOENT) || errors.Is(perr, unix.ENOENT):
		case rerr != nil:
			out[i] = trusted{why: fmt.Sprintf("%s: %v", path, rerr), readErr: true}
		case perr != nil:
			out[i] = trusted{why: fmt.Sprintf("%s: %v", path, perr), readErr: true}
		case v == "":
			out[i] = trusted{why: fmt.Sprintf("%s: empty", path)}
		default:
			if why := untrusted(perms); why != "" {
				out[i] = trusted{why: fmt.Sprintf("%s: %s", path, why)}
			} else {
				out[i] = trusted{value: v}
			}
		}
	}
	return out
}

// untrusted says why a node with permissions perms might have been written by
// someone other than the toolstack ("" if it cannot). The first entry is the
// owner (who may always write) and everyone's default access.
func untrusted(perms []xenstore.Perm) string {
	if len(perms) == 0 {
		return "no permissions returned"
	}
	if perms[0].Domid != ToolstackDomid {
		return fmt.Sprintf("owned by domain %d, not the toolstack (domain %d)", perms[0].Domid, ToolstackDomid)
	}
	if a := perms[0].Access; a == 'w' || a == 'b' {
		return fmt.Sprintf("every domain may write it (default access %q)", a)
	}
	for _, p := range perms[1:] {
		if p.Domid != ToolstackDomid && (p.Access == 'w' || p.Access == 'b') {
			return fmt.Sprintf("domain %d may write it", p.Domid)
		}
	}
	return ""
}

// maxLabel bounds a label value shown in logs and status.
const maxLabel = 128

// Labels name a backend for people: the frontend domain's name and the
// virtual device (BE/dev, e.g. xvda). "" when absent, unreadable (a driver
// domain may not read other domains' names) or longer than 128 bytes.
type Labels struct {
	Domain string
	Vdev   string
}

// ReadLabels reads the labels of each backend, in one batch.
func ReadLabels(ctx context.Context, s Batcher, bs ...Backend) []Labels {
	out := make([]Labels, len(bs))
	if ctx.Err() != nil {
		return out
	}
	ops := make([]xenstore.Op, 0, 2*len(bs))
	for _, b := range bs {
		ops = append(ops, LabelOps(b)...)
	}
	replies := s.Batch(ctx, ops)
	for i := range out {
		out[i] = ParseLabels(replies[2*i : 2*i+2])
	}
	return out
}

// LabelOps are the two reads of b's labels, for a caller that sends them in
// a batch of its own (ReadSnapshot's or Connect's also); ParseLabels decodes
// their replies.
func LabelOps(b Backend) []xenstore.Op {
	return []xenstore.Op{xenstore.Read(fmt.Sprintf("/local/domain/%d/name", b.Domid)), xenstore.Read(b.node("dev"))}
}

// ParseLabels decodes the replies to LabelOps ("" for a failed read: a
// transaction that failed, an unreadable node).
func ParseLabels(replies []xenstore.Reply) Labels {
	if len(replies) < 2 {
		return Labels{}
	}
	label := func(r xenstore.Reply) string {
		if r.Err != nil || len(r.Value) > maxLabel {
			return ""
		}
		return r.Value
	}
	return Labels{Domain: label(replies[0]), Vdev: label(replies[1])}
}
