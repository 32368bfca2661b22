package node

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/containerd/plugin"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// initMetricsServer starts the metrics listener: /metrics (the registry the resolver
// hook's /metrics serves) and /healthz, nothing else. The resolver hook must stay on
// loopback (it relays pulls for whoever reaches it); this listener exposes only counters,
// so it may bind the node's address where Prometheus can scrape it.
func initMetricsServer(ic *plugin.InitContext) (interface{}, error) {
	d := ic.Config.(*deps)
	if d.cfg.MetricsAddr == "" {
		return nil, fmt.Errorf("no metrics address: %w", plugin.ErrSkipPlugin)
	}
	if err := CheckMetricsAddr(d.cfg.MetricsAddr); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", d.cfg.MetricsAddr)
	if err != nil {
		return nil, fmt.Errorf("metrics listener: %w", err)
	}
	srv := &http.Server{
		Handler:           metricsMux(d.metrics),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(d.cfg.Logger.Handler(), slog.LevelWarn),
	}
	d.agent.servers = append(d.agent.servers, srv)
	d.agent.listeners = append(d.agent.listeners, ln)
	d.agent.MetricsAddr = ln.Addr().String()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.cfg.Logger.Error("metrics server stopped", "error", err)
		}
	}()
	d.cfg.Logger.Info("metrics serving", "addr", ln.Addr().String())
	return srv, nil
}

// metricsMux routes /metrics and /healthz; everything else, the mirror's /v2/ above all,
// is a 404 (a wrong method on those two a 405).
func metricsMux(m *metrics) *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	return mux
}

// CheckMetricsAddr checks a metrics listener address: HOST:PORT with a host (an IP
// address, 0.0.0.0 or [::] for every interface, or a name) and a port from 0 to 65535.
func CheckMetricsAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("metrics address %q: want HOST:PORT: %v", addr, err)
	}
	if host == "" {
		return fmt.Errorf("metrics address %q: name the host to bind (0.0.0.0 binds every interface)", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("metrics address %q: port %q is not a number from 0 to 65535", addr, port)
	}
	return nil
}
