// Package node assembles cove-node from its parts, each registered the way containerd
// registers its own plugins (github.com/containerd/plugin), so each can be switched on or
// off by configuration and the whole agent reads as one list (Registrations).
package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/plugin"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/plugin/content"
	"github.com/cove-oci/cove/plugin/mirror"
	"github.com/cove-oci/cove/plugin/prefill"
)

// Plugin types of cove-node's parts.
const (
	// TypeMirror is the resolver hook: containerd's _default registry mirror.
	TypeMirror plugin.Type = "io.cove.node.mirror.v1"
	// TypeServer is an HTTP server: "http", the loopback one that carries the mirror and
	// /metrics; "metrics", the one that carries /metrics alone (metricsserver.go).
	TypeServer plugin.Type = "io.cove.node.server.v1"
	// TypePrefill fills the content store with the blobs of manifests the mirror served.
	TypePrefill plugin.Type = "io.cove.node.prefill.v1"
)

// Config is cove-node's whole configuration, from flags.
type Config struct {
	// Addr is the loopback address of the resolver hook and /metrics.
	Addr string
	// MetricsAddr is the address of a second listener that serves /metrics and /healthz
	// and nothing else, so it may be reachable from off the node (Prometheus); "" none.
	MetricsAddr string
	// Mirror configures the resolver hook.
	Mirror mirror.Config
	// Content configures the content hook; an empty Root switches it (and the prefill,
	// which needs it) off: mirror-only mode.
	Content content.Config
	// Disabled lists plugin URIs (type.id) switched off.
	Disabled []string
	Logger   *slog.Logger
}

// Registrations is every part of cove-node, in one list.
func Registrations() plugin.Registry {
	var reg plugin.Registry
	for _, r := range content.Registrations(func(ic *plugin.InitContext) content.Config {
		d := ic.Config.(*deps)
		c := d.cfg.Content
		c.Logger = d.cfg.Logger
		return c
	}) {
		reg = reg.Register(r)
	}
	reg = reg.Register(&plugin.Registration{
		Type:     TypePrefill,
		ID:       "manifest",
		Requires: []plugin.Type{content.TypeGRPC},
		InitFn:   initPrefill,
	})
	reg = reg.Register(&plugin.Registration{
		Type:     TypeMirror,
		ID:       "resolver",
		Requires: []plugin.Type{TypePrefill},
		InitFn:   initMirror,
	})
	reg = reg.Register(&plugin.Registration{
		Type:     TypeServer,
		ID:       "http",
		Requires: []plugin.Type{TypeMirror},
		InitFn:   initServer,
	})
	reg = reg.Register(&plugin.Registration{
		Type:     TypeServer,
		ID:       "metrics",
		Requires: []plugin.Type{TypeMirror},
		InitFn:   initMetricsServer,
	})
	return reg
}

// Agent is a running cove-node.
type Agent struct {
	plugins *plugin.Set
	servers []*http.Server
	// listeners are the servers' listeners, closed by Close itself: a server's Serve
	// goroutine may not have started (a part after it failed to start), and its port is
	// to be free when Close returns.
	listeners []net.Listener
	closers   []io.Closer
	Addr      string
	// MetricsAddr is the metrics listener's address, when it runs.
	MetricsAddr string
	// ContentSocket is the content hook's socket, when it runs.
	ContentSocket string
}

type deps struct {
	cfg     *Config
	metrics *metrics
	agent   *Agent
	mirror  *mirror.Handler // set once the mirror part is up; the prefill fetches through it
}

// Start initializes every enabled part in dependency order and starts serving.
func Start(ctx context.Context, cfg Config) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	a := &Agent{plugins: plugin.NewPluginSet()}
	d := &deps{cfg: &cfg, metrics: newMetrics(), agent: a}
	disabled := map[string]bool{}
	for _, uri := range cfg.Disabled {
		disabled[uri] = true
	}
	for _, r := range Registrations().Graph(func(r *plugin.Registration) bool { return disabled[r.URI()] }) {
		ic := plugin.NewContext(ctx, a.plugins, map[string]string{})
		ic.Config = d
		p := r.Init(ic)
		if err := a.plugins.Add(p); err != nil {
			a.Close()
			return nil, err
		}
		if err := p.Err(); err != nil {
			if plugin.IsSkipPlugin(err) {
				cfg.Logger.Info("part skipped", "part", r.URI(), "reason", err)
				continue
			}
			a.Close()
			return nil, fmt.Errorf("%s: %w", r.URI(), err)
		}
		if inst, _ := p.Instance(); inst != nil {
			if svc, ok := inst.(*content.Service); ok {
				a.closers = append(a.closers, svc)
				a.ContentSocket = svc.Addr()
			}
		}
		cfg.Logger.Debug("part started", "part", r.URI())
	}
	return a, nil
}

// Close stops the servers.
func (a *Agent) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, s := range a.servers {
		_ = s.Shutdown(ctx)
	}
	for _, ln := range a.listeners {
		_ = ln.Close()
	}
	for _, c := range a.closers {
		_ = c.Close()
	}
}

func initPrefill(ic *plugin.InitContext) (interface{}, error) {
	d := ic.Config.(*deps)
	if d.cfg.Content.Root == "" {
		return nil, fmt.Errorf("content hook off (mirror-only mode): %w", plugin.ErrSkipPlugin)
	}
	svc, err := ic.GetSingle(content.TypeGRPC)
	if err != nil {
		return nil, fmt.Errorf("prefill needs the content hook: %w", plugin.ErrSkipPlugin)
	}
	return prefill.New(prefill.Config{
		ContentRoot: d.cfg.Content.Root,
		// Beside the store, on its filesystem (renamed into blobs/), outside blobs/ (the
		// GC lists every file there).
		SpoolDir: filepath.Join(d.cfg.Content.Root, ".cove-prefill-spool"),
		Fetch: func(ctx context.Context, registry, repo string, dg digest.Digest, h http.Header) (*http.Response, error) {
			if d.mirror == nil {
				return nil, errors.New("resolver hook not ready")
			}
			return d.mirror.FetchFromCache(ctx, registry, repo, dg, h)
		},
		Protect: svc.(*content.Service).Protect,
		Logger:  d.cfg.Logger,
	})
}

func initMirror(ic *plugin.InitContext) (interface{}, error) {
	d := ic.Config.(*deps)
	mcfg := d.cfg.Mirror
	mcfg.Logger = d.cfg.Logger
	mcfg.Observe = d.metrics.observe
	mcfg.AroundCache = d.metrics.aroundCache
	if p, err := ic.GetSingle(TypePrefill); err == nil {
		pf := p.(*prefill.Prefiller)
		mcfg.OnManifest = pf.OnManifest
		mcfg.Joinable = pf.Joinable
	}
	if len(mcfg.Caches) == 0 {
		d.cfg.Logger.Warn("no --cache given: every pull goes straight to the origin")
	}
	h, err := mirror.New(mcfg)
	if err != nil {
		return nil, err
	}
	d.metrics.watchBreakers(h)
	d.mirror = h
	d.agent.closers = append(d.agent.closers, h)
	return h, nil
}

func initServer(ic *plugin.InitContext) (interface{}, error) {
	d := ic.Config.(*deps)
	m, err := ic.GetSingle(TypeMirror)
	if err != nil {
		return nil, err
	}
	mux := metricsMux(d.metrics)
	mux.Handle("/v2/", m.(http.Handler))
	mux.Handle("/v2", m.(http.Handler))
	ln, err := net.Listen("tcp", d.cfg.Addr)
	if err != nil {
		return nil, err
	}
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(d.cfg.Logger.Handler(), slog.LevelWarn),
	}
	d.agent.servers = append(d.agent.servers, srv)
	d.agent.listeners = append(d.agent.listeners, ln)
	d.agent.Addr = ln.Addr().String()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.cfg.Logger.Error("resolver hook server stopped", "error", err)
		}
	}()
	d.cfg.Logger.Info("resolver hook serving", "addr", ln.Addr().String(), "caches", d.cfg.Mirror.Caches)
	return srv, nil
}

type metrics struct {
	reg      *prometheus.Registry
	requests *prometheus.CounterVec
	resumes  prometheus.Counter
	around   *prometheus.CounterVec

	mu         sync.Mutex
	registries map[string]bool // registry label values in use, at most maxRegistryLabels
}

// maxRegistryLabels bounds the registry label: registries past it count as "other".
const maxRegistryLabels = 64

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_node_requests_total",
			Help: "Pull requests from containerd by where they were served from (cache; prefill; origin: relayed by cove-node; handoff: 503 sent so containerd fetched from the origin itself) and, for origin and handoff, why (breaker-open, connect, headers, status, stall, slow-origin, no-cache).",
		}, []string{"served_by", "reason"}),
		resumes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cove_node_resumes_total",
			Help: "Blobs cove-cache broke off that were finished with a Range request: from the next cove-cache in the blob's rank (served_by cache in cove_node_requests_total), else from the origin.",
		}),
	}
	m.around = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cove_node_pulls_around_cache_total",
		Help: "Pulls that went round the cache for want of credentials: cove-node relayed a 401 to a manifest request and no request for that repository succeeded through it within the window, so containerd fetched from the registry itself. reason: no-credentials (containerd sent none: CRI credentials whose server_address names the registry, not the mirror), credentials-refused (what it sent, often an anonymous token, was refused too).",
	}, []string{"registry", "reason"})
	m.registries = map[string]bool{}
	m.reg.MustRegister(m.requests, m.resumes, m.around, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) aroundCache(registry, _, reason string) {
	m.around.WithLabelValues(m.registryLabel(registry), reason).Inc()
}

// registryLabel is registry while fewer than maxRegistryLabels are in use, else "other":
// registries are whatever containerd names.
func (m *metrics) registryLabel(registry string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.registries[registry] {
		return registry
	}
	if len(m.registries) >= maxRegistryLabels {
		return "other"
	}
	m.registries[registry] = true
	return registry
}

func (m *metrics) observe(servedBy, reason string, resumed bool) {
	m.requests.WithLabelValues(servedBy, reason).Inc()
	if resumed {
		m.resumes.Inc()
	}
}

func (m *metrics) watchBreakers(h *mirror.Handler) {
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cove_node_caches_bypassed",
		Help: "cove-cache endpoints whose circuit breaker is open (requests go to the origin).",
	}, func() float64 {
		n := 0
		for _, open := range h.BreakerOpen() {
			if open {
				n++
			}
		}
		return float64(n)
	}))
	m.reg.MustRegister(cacheCollector{h})
}

// cacheUp is the caches the resolver hook sends requests to now: the --cache URLs and,
// with --caches-from-endpointslices, the replicas the Service's EndpointSlices list.
var cacheUp = prometheus.NewDesc("cove_node_cache_up",
	"cove-cache endpoints this node sends requests to now, by URL and source (flag: --cache; members: the Service's ready EndpointSlices): 1 in use, 0 bypassed (circuit breaker open).",
	[]string{"cache", "source"}, nil)

// cacheCollector reads the list at every scrape: it changes as replicas come and go.
type cacheCollector struct{ h *mirror.Handler }

func (c cacheCollector) Describe(ch chan<- *prometheus.Desc) { ch <- cacheUp }

func (c cacheCollector) Collect(ch chan<- prometheus.Metric) {
	for _, cs := range c.h.Caches() {
		v := 1.0
		if cs.Bypassed {
			v = 0
		}
		ch <- prometheus.MustNewConstMetric(cacheUp, prometheus.GaugeValue, v, cs.URL, cs.Source)
	}
}
