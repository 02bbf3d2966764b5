package daemon

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"xenblkd/internal/metrics"
)

// The metrics endpoint is a minimal HTTP/1.1 responder on package net: one
// GET /metrics per connection, then close. net/http is not linked into the
// binary (docs/architecture.md: it costs every hotplug exec ~1 ms of init).
const (
	maxMetricsHead  = 8 << 10         // request line + headers
	metricsTimeout  = 5 * time.Second // a whole exchange
	maxMetricsConns = 8               // served at once; more are closed at once
	MetricsPath     = "/metrics"
)

// ListenMetrics opens the metrics endpoint at addr: "unix:/path/to/socket",
// or "IP:port" on a loopback address (127.0.0.1:9xxx, [::1]:port). Metrics
// tell which domains run which disks, so other addresses are refused: put a
// proxy in front to export them.
func ListenMetrics(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if !filepath.IsAbs(path) {
			return nil, fmt.Errorf("metrics address %q: the socket path must be absolute (unix:/run/xenblkd/metrics.sock)", addr)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("metrics address %q: something already listens there", addr)
		}
		if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(path) // stale: nobody answered
		}
		l, err := net.Listen("unix", path)
		if err != nil {
			return nil, fmt.Errorf("metrics address %q: %w", addr, err)
		}
		return l, nil
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("metrics address %q: want IP:port on loopback (127.0.0.1:9xxx or [::1]:9xxx) or unix:/path", addr)
	}
	if !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("metrics address %q: %s is not a loopback address; xenblkd serves metrics on loopback or a unix socket only", addr, ap.Addr())
	}
	l, err := net.Listen("tcp", ap.String())
	if err != nil {
		return nil, fmt.Errorf("metrics address %q: %w", addr, err)
	}
	return l, nil
}

// ServeMetrics answers GET /metrics on l until ctx is done, then waits for
// the exchanges in flight.
func (d *Daemon) ServeMetrics(ctx context.Context, l net.Listener) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	slots := make(chan struct{}, maxMetricsConns)
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			d.log.Error("metrics: accept", "err", err)
			time.Sleep(10 * time.Millisecond) // e.g. EMFILE: do not spin
			continue
		}
		select {
		case slots <- struct{}{}:
		default:
			c.Close() // busy: a scraper retries
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			serveMetricsConn(c, &d.metrics.Registry)
		}()
	}
}

func serveMetricsConn(c net.Conn, reg *metrics.Registry) {
	defer lingeringClose(c)
	c.SetDeadline(time.Now().Add(metricsTimeout))
	head, err := readHead(c)
	if err != nil {
		writeHTTP(c, "400 Bad Request", "text/plain; charset=utf-8", []byte(err.Error()+"\n"), true)
		return
	}
	method, path, err := ParseRequestHead(head)
	switch {
	case err != nil:
		writeHTTP(c, "400 Bad Request", "text/plain; charset=utf-8", []byte(err.Error()+"\n"), true)
	case path != MetricsPath:
		writeHTTP(c, "404 Not Found", "text/plain; charset=utf-8", []byte("404 not found: xenblkd serves "+MetricsPath+"\n"), method != "HEAD")
	case method != "GET" && method != "HEAD":
		writeHTTP(c, "405 Method Not Allowed", "text/plain; charset=utf-8", []byte("405 method not allowed: use GET\n"), true)
	default:
		var body bytes.Buffer
		if err := reg.WriteText(&body); err != nil {
			writeHTTP(c, "500 Internal Server Error", "text/plain; charset=utf-8", []byte(err.Error()+"\n"), true)
			return
		}
		writeHTTP(c, "200 OK", metrics.ContentType, body.Bytes(), method == "GET")
	}
}

// readHead reads up to the blank line that ends the request headers.
func readHead(r io.Reader) ([]byte, error) {
	buf := make([]byte, 0, 1024)
	chunk := make([]byte, 1024)
	for {
		if i := bytes.Index(buf, []byte("\r\n\r\n")); i >= 0 {
			return buf[:i], nil
		}
		if i := bytes.Index(buf, []byte("\n\n")); i >= 0 {
			return buf[:i], nil
		}
		if len(buf) >= maxMetricsHead {
			return nil, fmt.Errorf("request headers exceed %d bytes", maxMetricsHead)
		}
		n, err := r.Read(chunk[:min(len(chunk), maxMetricsHead-len(buf))])
		buf = append(buf, chunk[:n]...)
		if err != nil {
			if n > 0 {
				continue
			}
			return nil, fmt.Errorf("incomplete request: %w", err)
		}
	}
}

// ParseRequestHead returns the method and path (without query) of an HTTP/1.x
// request head: the request line, then headers, which are ignored.
func ParseRequestHead(head []byte) (method, path string, err error) {
	line, _, _ := bytes.Cut(head, []byte("\n"))
	line = bytes.TrimSuffix(line, []byte("\r"))
	parts := strings.Split(string(line), " ")
	if len(parts) != 3 || parts[0] == "" || !strings.HasPrefix(parts[1], "/") || !strings.HasPrefix(parts[2], "HTTP/1.") {
		return "", "", errors.New("malformed request line: want METHOD /path HTTP/1.x")
	}
	for _, r := range parts[0] {
		if r < 'A' || r > 'Z' {
			return "", "", errors.New("malformed request line: bad method")
		}
	}
	path, _, _ = strings.Cut(parts[1], "?")
	return parts[0], path, nil
}

func writeHTTP(w io.Writer, status, contentType string, body []byte, withBody bool) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n", status, contentType, len(body))
	if strings.HasPrefix(status, "405") {
		b.WriteString("Allow: GET, HEAD\r\n")
	}
	b.WriteString("\r\n")
	if withBody {
		b.Write(body)
	}
	w.Write(b.Bytes())
}

// lingeringClose closes c after the client has read the reply: closing with
// unread input (an over-long request) would reset the connection and lose
// the reply. The drain is bounded in size and by c's deadline.
func lingeringClose(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		io.Copy(io.Discard, io.LimitReader(c, 4*maxMetricsHead))
	}
	c.Close()
}
