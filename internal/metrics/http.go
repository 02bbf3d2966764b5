// Package metrics serves the daemon's Prometheus metrics (docs/metrics.md)
// over HTTP: net/http and promhttp, on loopback TCP or a unix socket.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"xenblkd/internal/unixsock"
)

// The metrics endpoint: net/http and promhttp. The daemon is no longer exec'd
// per disk (the hotplug entry libxl execs is the small C program), so their
// start-up cost is paid once (docs/architecture.md).
const (
	Path        = "/metrics"
	MaxHeader   = 8 << 10         // request line + headers
	Timeout     = 5 * time.Second // reading a request; gathering one scrape
	MaxInFlight = 8               // scrapes gathered at once; more get 503
)

// Listen opens the metrics endpoint at addr: "unix:/path/to/socket",
// or "IP:port" on a loopback address (127.0.0.1:9xxx, [::1]:port). Metrics
// tell which domains run which disks, so other addresses are refused: put a
// proxy in front to export them.
func Listen(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if !filepath.IsAbs(path) {
			return nil, fmt.Errorf("metrics address %q: the socket path must be absolute (unix:/run/xenblkd/metrics.sock)", addr)
		}
		l, err := unixsock.Listen(path, 0) // the umask decides its mode (docs/metrics.md)
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

// Handler serves GET (and HEAD) /metrics from r; other paths get 404,
// other methods 405. It also counts its own scrapes
// (promhttp_metric_handler_requests_total).
func Handler(r *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET "+Path, promhttp.InstrumentMetricHandler(r, promhttp.HandlerFor(r, promhttp.HandlerOpts{
		Registry:            r, // counts promhttp_metric_handler_errors_total
		MaxRequestsInFlight: MaxInFlight,
		Timeout:             Timeout,
	})))
	return mux
}

// Serve serves h (Handler) on l until ctx is done, then waits (at most
// Timeout) for the scrapes in flight.
func Serve(ctx context.Context, l net.Listener, h http.Handler, log *slog.Logger) error {
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: Timeout,
		ReadTimeout:       Timeout,
		WriteTimeout:      2 * Timeout,
		IdleTimeout:       time.Minute,
		MaxHeaderBytes:    MaxHeader,
		ErrorLog:          slog.NewLogLogger(log.With("metrics", true).Handler(), slog.LevelWarn),
	}
	shutDown := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(shutDown)
		sctx, cancel := context.WithTimeout(context.Background(), Timeout)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			srv.Close()
		}
	})
	err := srv.Serve(l)
	if !errors.Is(err, http.ErrServerClosed) {
		if stop() {
			l.Close()
		}
		return fmt.Errorf("serve metrics: %w", err)
	}
	<-shutDown
	return nil
}
