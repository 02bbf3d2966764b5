package xenstore

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Message types (xen/io/xs_wire.h, enum xsd_sockmsg_type).
const (
	typeControl uint32 = iota
	typeDirectory
	typeRead
	typeGetPerms
	typeWatch
	typeUnwatch
	typeTransactionStart
	typeTransactionEnd
	typeIntroduce
	typeRelease
	typeGetDomainPath
	typeWrite
	typeMkdir
	typeRm
	typeSetPerms
	typeWatchEvent
	typeError
)

// typeDirectoryPart is XS_DIRECTORY_PART (XS_RESET_WATCHES + 1 = 22), for
// listings that do not fit one reply; C xenstored and oxenstored have it since
// Xen 4.9.
const typeDirectoryPart uint32 = 22

const (
	headerSize = 16
	// MaxPayload is XENSTORE_PAYLOAD_MAX: the largest payload of one message,
	// in either direction. The client refuses larger requests with ErrTooLarge.
	MaxPayload = 4096
	// maxReplyPayload bounds what the reader accepts. oxenstored does not
	// apply MaxPayload to the replies it sends on its unix socket (a DIRECTORY
	// of 1,200 names came back as one 8,400-byte reply, where C xenstored
	// answers E2BIG and the client lists in parts), so larger replies are read;
	// a length beyond this bound means a corrupt stream.
	maxReplyPayload = 1 << 20
)

// frame is one decoded message.
type frame struct {
	typ, reqID, txID uint32
	payload          []byte
}

// putHeader writes the 16-byte little-endian header {type, req_id, tx_id, len}.
func putHeader(b []byte, typ, reqID, txID, n uint32) {
	binary.LittleEndian.PutUint32(b[0:], typ)
	binary.LittleEndian.PutUint32(b[4:], reqID)
	binary.LittleEndian.PutUint32(b[8:], txID)
	binary.LittleEndian.PutUint32(b[12:], n)
}

// errFrameTooLarge: the peer announced a payload above maxReplyPayload. The
// stream cannot be trusted after that, so the connection is dropped.
var errFrameTooLarge = errors.New("reply payload exceeds 1 MiB")

// frameReader decodes frames from a byte stream.
type frameReader struct {
	r   *bufio.Reader
	hdr [headerSize]byte
}

func newFrameReader(r io.Reader) *frameReader {
	return &frameReader{r: bufio.NewReaderSize(r, 2*(headerSize+MaxPayload))}
}

// next returns the next frame; its payload is freshly allocated (it is handed
// to another goroutine). A stream ending inside a frame is io.ErrUnexpectedEOF.
func (fr *frameReader) next() (frame, error) {
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		return frame{}, err
	}
	f := frame{
		typ:   binary.LittleEndian.Uint32(fr.hdr[0:]),
		reqID: binary.LittleEndian.Uint32(fr.hdr[4:]),
		txID:  binary.LittleEndian.Uint32(fr.hdr[8:]),
	}
	n := binary.LittleEndian.Uint32(fr.hdr[12:])
	if n > maxReplyPayload {
		return frame{}, fmt.Errorf("%w (type %d, %d bytes)", errFrameTooLarge, f.typ, n)
	}
	f.payload = make([]byte, n)
	if _, err := io.ReadFull(fr.r, f.payload); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return frame{}, err
	}
	return f, nil
}

// xsErrors maps the error names of XS_ERROR replies (xs_wire.h xsd_errors,
// plus oxenstored's EQUOTA) to errnos.
var xsErrors = map[string]unix.Errno{
	"EINVAL":    unix.EINVAL,
	"EACCES":    unix.EACCES,
	"EEXIST":    unix.EEXIST,
	"EISDIR":    unix.EISDIR,
	"ENOENT":    unix.ENOENT,
	"ENOMEM":    unix.ENOMEM,
	"ENOSPC":    unix.ENOSPC,
	"EIO":       unix.EIO,
	"ENOTEMPTY": unix.ENOTEMPTY,
	"ENOSYS":    unix.ENOSYS,
	"EROFS":     unix.EROFS,
	"EBUSY":     unix.EBUSY,
	"EAGAIN":    unix.EAGAIN,
	"EISCONN":   unix.EISCONN,
	"E2BIG":     unix.E2BIG,
	"EPERM":     unix.EPERM,
	"EQUOTA":    unix.EDQUOT, // oxenstored: a domain quota was hit
}

// parseError turns an XS_ERROR payload ("ENOENT\0") into an errno. Unknown
// names become an error that still matches unix.EIO.
func parseError(p []byte) error {
	name := string(bytes.TrimRight(p, "\x00"))
	if e, ok := xsErrors[name]; ok {
		return e
	}
	return fmt.Errorf("unknown xenstored error %q: %w", name, unix.EIO)
}

// parseWatchEvent splits an XS_WATCH_EVENT payload "path\0token\0".
func parseWatchEvent(p []byte) (path, token string, err error) {
	i := bytes.IndexByte(p, 0)
	if i < 0 {
		return "", "", fmt.Errorf("watch event %q: no NUL after path", p)
	}
	rest := p[i+1:]
	j := bytes.IndexByte(rest, 0)
	if j < 0 {
		j = len(rest) // tolerate a missing final NUL
	}
	return string(p[:i]), string(rest[:j]), nil
}

// parseDirectory splits a DIRECTORY reply "a\0b\0" into names.
func parseDirectory(p []byte) []string {
	p = bytes.TrimSuffix(p, []byte{0})
	if len(p) == 0 {
		return []string{}
	}
	// One string allocation; the names share it.
	return strings.Split(string(p), "\x00")
}

// parseDirectoryPart splits a DIRECTORY_PART reply into the directory's
// generation and the chunk of NUL-terminated names that follows it.
func parseDirectoryPart(p []byte) (generation string, chunk []byte, err error) {
	i := bytes.IndexByte(p, 0)
	if i <= 0 {
		return "", nil, fmt.Errorf("directory part reply without a generation: %w", unix.EINVAL)
	}
	return string(p[:i]), p[i+1:], nil
}

// parsePerms parses a GET_PERMS reply "n0\0r5\0".
func parsePerms(p []byte) ([]Perm, error) {
	p = bytes.TrimSuffix(p, []byte{0})
	if len(p) == 0 {
		return nil, fmt.Errorf("empty permission list: %w", unix.EINVAL)
	}
	var perms []Perm
	for _, f := range bytes.Split(p, []byte{0}) {
		if len(f) < 2 {
			return nil, fmt.Errorf("permission %q: too short: %w", f, unix.EINVAL)
		}
		switch f[0] {
		case 'n', 'r', 'w', 'b':
		default:
			return nil, fmt.Errorf("permission %q: access not one of n, r, w, b: %w", f, unix.EINVAL)
		}
		d, err := strconv.ParseUint(string(f[1:]), 10, 32)
		if err != nil {
			return nil, fmt.Errorf("permission %q: domid: %w", f, unix.EINVAL)
		}
		perms = append(perms, Perm{Domid: uint32(d), Access: f[0]})
	}
	return perms, nil
}

// formatPerm formats one permission as on the wire ("r5").
func formatPerm(p Perm) string {
	return string(p.Access) + strconv.FormatUint(uint64(p.Domid), 10)
}

// parseTxID parses a TRANSACTION_START reply "17\0".
func parseTxID(p []byte) (uint32, error) {
	s := string(bytes.TrimSuffix(p, []byte{0}))
	id, err := strconv.ParseUint(s, 10, 32)
	if err != nil || id == 0 {
		return 0, fmt.Errorf("transaction id %q: %w", s, unix.EINVAL)
	}
	return uint32(id), nil
}
