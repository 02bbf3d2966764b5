// Package server serves the daemon's API (internal/api) on a unix socket:
// one request per connection, from root (or the daemon's own uid) only.
package server

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"xenblkd/internal/api"
	"xenblkd/internal/unixsock"
)

// Listen creates the API socket: its directory 0700 if missing, the socket
// 0600. A stale socket (nobody answers) is replaced; a live one is an error.
// It refuses a directory that non-root users can write (unixsock.ErrUnsafeDir).
func Listen(path string) (*net.UnixListener, error) {
	l, err := unixsock.Listen(path, 0o600)
	if errors.Is(err, unixsock.ErrInUse) {
		return nil, fmt.Errorf("listen on %s: another xenblkd daemon is already running there", path)
	}
	return l, err
}

// ListenFD takes over fd, a listening unix stream socket passed by the
// service manager (socket activation: xenblkd.socket). The socket stays
// systemd's: closing the listener leaves it open, so connections made while
// the daemon restarts wait in its backlog for the next daemon.
func ListenFD(fd int) (*net.UnixListener, error) {
	if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || v != 1 {
		return nil, fmt.Errorf("passed fd %d is not a listening socket (check xenblkd.socket's ListenStream=): %v", fd, err)
	}
	f := os.NewFile(uintptr(fd), "xenblkd.socket")
	defer f.Close() // FileListener holds its own dup
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("passed fd %d: %w", fd, err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("passed fd %d is a %s socket, not a unix socket (check xenblkd.socket's ListenStream=)", fd, l.Addr().Network())
	}
	// The same directory check as Listen's (a few stats): a socket that
	// lives in a directory non-root users can write could be replaced.
	if path := ul.Addr().String(); filepath.IsAbs(path) {
		if err := unixsock.CheckDir(filepath.Dir(path)); err != nil {
			ul.Close()
			return nil, err
		}
	}
	return ul, nil
}

// Handler answers one API request.
type Handler interface {
	Handle(ctx context.Context, req api.Request) api.Response
}

// Serve answers requests on l with h until ctx is done, then waits for the
// requests in flight. Only root and the daemon's own uid may talk to it.
func Serve(ctx context.Context, l *net.UnixListener, h Handler, log *slog.Logger) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			log.Error("accept", "err", err)
			time.Sleep(10 * time.Millisecond) // e.g. EMFILE: do not spin
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			serveConn(context.WithoutCancel(ctx), c, h, log)
		}()
	}
}

func serveConn(ctx context.Context, c *net.UnixConn, h Handler, log *slog.Logger) {
	defer c.Close()
	// Reading the request and answering it fit in the entry's wait
	// (api.ReplyTimeout); an adoption's reply comes when it is done.
	c.SetDeadline(time.Now().Add(api.ReplyTimeout))
	uid, pid, err := peerCred(c)
	if err != nil {
		log.Error("read peer credentials", "err", err)
		return
	}
	if uid != 0 && uid != uint32(os.Getuid()) {
		log.Warn("refused API client", "uid", uid, "pid", pid)
		writeReply(c, api.Response{Error: fmt.Sprintf("permission denied: uid %d may not use xenblkd (root only)", uid)})
		return
	}
	r := bufio.NewReaderSize(c, api.MaxRequest)
	line, err := r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		log.Warn("read request", "pid", pid, "err", "longer than the limit", "limit", api.MaxRequest)
		writeReply(c, api.Response{Error: fmt.Sprintf("malformed request: longer than %d bytes", api.MaxRequest)})
		return
	}
	if err != nil {
		// A client that connects and closes without a word is a probe
		// (xenblkd doctor, a health check): nothing to warn about.
		if errors.Is(err, io.EOF) && len(line) == 0 {
			log.Debug("client closed without a request", "pid", pid)
		} else {
			log.Warn("read request", "pid", pid, "err", err)
		}
		return
	}
	var req api.Request
	if err := json.Unmarshal(line, &req); err != nil {
		writeReply(c, api.Response{Error: fmt.Sprintf("malformed request: %v", err)})
		return
	}
	if api.Timeout(req.Op) == 0 {
		c.SetDeadline(time.Time{})
	}
	writeReply(c, h.Handle(ctx, req))
}

func writeReply(c net.Conn, resp api.Response) {
	b, _ := json.Marshal(resp)
	c.Write(append(b, '\n'))
}

func peerCred(c *net.UnixConn) (uid uint32, pid int32, err error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, 0, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, 0, err
	}
	if cerr != nil {
		return 0, 0, cerr
	}
	return cred.Uid, cred.Pid, nil
}
