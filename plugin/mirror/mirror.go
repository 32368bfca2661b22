// Package mirror is cove-node's resolver hook: the OCI distribution endpoint on loopback
// that containerd uses as its _default registry mirror. It forwards every pull request to
// cove-cache and, when cove-cache is down, hung or stalling, finishes the request from the
// origin itself within bounded times, resuming a half-sent blob with a Range request, so
// containerd never sees cove fail.
//
// Waiting is bounded twice. A first, short bound (HeaderTimeout, StallTimeout) triggers a
// health probe of cove-cache. A dead or hung cache fails the probe and the request moves to
// the origin at once. A healthy cache means the origin behind it is slow (a cold fill), and
// then the request keeps waiting up to a long bound: falling back there would send every
// node to the slow origin at once, the egress storm the cache exists to prevent.
package mirror

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/plugin/breaker"
	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/fill"
	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/origin"
	"github.com/cove-oci/cove/proxy/route"
)

// Config configures the resolver hook. Zero durations take the defaults.
type Config struct {
	// Caches are cove-cache base URLs (http://host:port). One is tried alone; several are
	// replicas of one cove-cache, ranked per request the way the replicas rank owners
	// (caches.go): a blob goes to its owner first, then to the next in rank.
	Caches []string
	// Members, when set, lists the replicas (their member URLs) as they come and go (the
	// Service's EndpointSlices): they are ranked per request like Caches, and Caches
	// follow them, used alone while Members is empty. The caller runs it.
	Members cluster.Membership
	// PlainHTTP lists origins (host:port) reached over plain HTTP when falling back.
	PlainHTTP []string
	// ConnectTimeout bounds the TCP connect to cove-cache (default 300 ms).
	ConnectTimeout time.Duration
	// HeaderTimeout is how long to wait for cove-cache's response headers before probing
	// its health (default 2 s).
	HeaderTimeout time.Duration
	// StallTimeout is how long a body may send nothing before probing (default 5 s).
	StallTimeout time.Duration
	// SlowOriginTimeout bounds the wait on a healthy cove-cache whose origin is slow, for
	// headers and for body stalls alike (default 25 s: containerd gives up on response
	// headers after 30 s).
	SlowOriginTimeout time.Duration
	// ProbeTimeout bounds one health probe (default 300 ms).
	ProbeTimeout time.Duration
	// ProbeAfter is when the first health probe goes out once headers or body bytes are
	// late (default 250 ms): a dead cache is then left after ProbeAfter+ProbeTimeout
	// instead of HeaderTimeout or StallTimeout, while a healthy one is waited on as long
	// as before. Later probes follow every HeaderTimeout (headers) or StallTimeout (body).
	ProbeAfter time.Duration
	// Fallback says what happens to a request cove-cache cannot serve, before anything was
	// sent: FallbackHandoff (default) answers 503 at once, and containerd, which moves to
	// its next host on any 5xx from a mirror, fetches from the origin itself, so cove-node
	// leaves the data path during an outage; FallbackRelay fetches from the origin and
	// relays the answer. A blob cove-cache broke off mid-body is always finished by
	// cove-node (relay), since only it knows where to resume.
	Fallback string
	// ProbeInterval is how often each cove-cache's health is checked in the background
	// (default 1 s; negative: never), so a cache that died between pulls is bypassed
	// before the next pull asks it anything.
	ProbeInterval time.Duration
	// TLSConfig, when set, is the TLS client configuration for https:// cove-cache URLs
	// (for example RootCAs from cove-node's --cache-ca); nil uses the system roots. It is
	// not used when Transport is set.
	TLSConfig *tls.Config
	// Transport overrides the transport to cove-cache (tests); OriginTransport, to origins.
	Transport       http.RoundTripper
	OriginTransport http.RoundTripper
	Logger          *slog.Logger
	// Observe is called once per request with where it was served from ("cache",
	// "origin") and, for origin, why ("breaker-open", "connect", "headers", "status",
	// "stall", "no-cache"); resumed is true when a body was finished from the origin.
	Observe func(servedBy, reason string, resumed bool)
	// OnManifest, when set, sees every image manifest served from cove-cache by GET; the
	// function it returns (if any) runs before the body is sent, holding it back while
	// the blobs the manifest names are prefilled (see plugin/prefill).
	OnManifest func(ctx context.Context, m Manifest) (hold func(context.Context))
	// Joinable, when set, returns a running prefill of blob d for this client (same
	// registry, repository and credentials), acquired; containerd's own GET of that blob
	// is then served from it, so no byte is fetched twice.
	Joinable func(registry, repository string, d digest.Digest, header http.Header) *fill.Fill
	// AroundCache, when set, is told of every pull that went round the cache for want of
	// credentials: a 401 to a manifest request for the repository, and no successful
	// answer for it within AroundCacheWindow (default 10 s); reason is
	// AroundNoCredentials or AroundRefused. A warning is logged too, at most once per
	// repository every 10 minutes.
	AroundCache       func(registry, repository, reason string)
	AroundCacheWindow time.Duration
}

// Fallback modes (Config.Fallback).
const (
	FallbackHandoff = "handoff"
	FallbackRelay   = "relay"
)

// Manifest is an image manifest the resolver hook served, whole and verified.
type Manifest struct {
	Registry, Repository string
	Digest               digest.Digest
	MediaType            string
	Body                 []byte
	// Header is the client's request header: its credentials fetched the manifest.
	Header http.Header
}

// maxManifestSize bounds the manifests held in memory for OnManifest.
const maxManifestSize = 4 << 20

func (c *Config) defaults() {
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = 300 * time.Millisecond
	}
	if c.HeaderTimeout == 0 {
		c.HeaderTimeout = 2 * time.Second
	}
	if c.StallTimeout == 0 {
		c.StallTimeout = 5 * time.Second
	}
	if c.SlowOriginTimeout == 0 {
		c.SlowOriginTimeout = 25 * time.Second
	}
	if c.ProbeTimeout == 0 {
		c.ProbeTimeout = 300 * time.Millisecond
	}
	if c.Fallback == "" {
		c.Fallback = FallbackHandoff
	}
	if c.ProbeInterval == 0 {
		c.ProbeInterval = time.Second
	}
	if c.ProbeAfter == 0 {
		c.ProbeAfter = 250 * time.Millisecond
	}
	c.ProbeAfter = min(c.ProbeAfter, c.HeaderTimeout, c.StallTimeout)
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Observe == nil {
		c.Observe = func(string, string, bool) {}
	}
	if c.AroundCache == nil {
		c.AroundCache = func(string, string, string) {}
	}
	if c.AroundCacheWindow == 0 {
		c.AroundCacheWindow = 10 * time.Second
	}
}

// Handler serves the distribution pull API for containerd.
type Handler struct {
	stop        chan struct{}
	cfg         Config
	set         cacheSet
	breakerOpts []breaker.Option
	origin      *origin.Client
	router      route.Router
	log         *slog.Logger
	around      *aroundWatch
}

type cacheEndpoint struct {
	base    string
	member  string // the name it is ranked by (memberName)
	source  string // SourceFlag or SourceMembers
	client  *http.Client
	probe   func(ctx context.Context) bool
	breaker *breaker.Breaker

	transport *http.Transport // its own (nil with Config.Transport): idle connections closed with it
	stop      chan struct{}   // closed when it leaves the set: ends its health check
	closeOnce sync.Once
}

// New builds the resolver hook.
func New(cfg Config, opts ...breaker.Option) (*Handler, error) {
	cfg.defaults()
	if cfg.Fallback != FallbackHandoff && cfg.Fallback != FallbackRelay {
		return nil, fmt.Errorf("fallback %q: want %s or %s", cfg.Fallback, FallbackHandoff, FallbackRelay)
	}
	h := &Handler{cfg: cfg, log: cfg.Logger, stop: make(chan struct{}), breakerOpts: opts}
	h.around = newAroundWatch(cfg.AroundCacheWindow, 10*time.Minute, cfg.AroundCache, cfg.Logger)
	for _, raw := range cfg.Caches {
		base := strings.TrimRight(raw, "/")
		if u, err := url.Parse(base); err != nil || (u.Scheme != "http" && u.Scheme != "https") {
			h.Close()
			return nil, fmt.Errorf("cache URL %q: want http:// or https://", raw)
		}
		if slices.ContainsFunc(h.set.static, func(ep *cacheEndpoint) bool { return ep.member == memberName(base) }) {
			continue // the same cache twice: one endpoint, one breaker
		}
		h.set.static = append(h.set.static, h.newEndpoint(base, SourceFlag))
	}
	oopts := []origin.Option{origin.WithPlainHTTP(cfg.PlainHTTP...)}
	if cfg.OriginTransport != nil {
		oopts = append(oopts, origin.WithTransport(cfg.OriginTransport))
	}
	h.origin = origin.New(oopts...)
	if cfg.Members != nil {
		h.setMembers(cfg.Members.Members())
		go h.followMembers()
	}
	return h, nil
}

// monitor checks a cache's health at start and every ProbeInterval, opening its breaker
// on a failed check (the breaker's own probe closes it again).
func (h *Handler) monitor(ep *cacheEndpoint) {
	t := time.NewTicker(h.cfg.ProbeInterval)
	defer t.Stop()
	for {
		if ep.breaker.Allow() && !h.probe(context.Background(), ep) {
			ep.breaker.Failure()
		}
		select {
		case <-h.stop:
			return
		case <-ep.stop:
			return
		case <-t.C:
		}
	}
}

// Close stops the background health checks.
func (h *Handler) Close() error {
	select {
	case <-h.stop:
	default:
		close(h.stop)
	}
	h.around.close()
	h.closeCaches()
	return nil
}

func (h *Handler) closeCaches() {
	for _, ep := range h.allCaches() {
		ep.close()
	}
}

// BreakerOpen reports, per cache URL, whether requests bypass it now.
func (h *Handler) BreakerOpen() map[string]bool {
	m := map[string]bool{}
	for _, ep := range h.allCaches() {
		m[ep.base] = ep.breaker.Open()
	}
	return m
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Docker-Distribution-Api-Version", "registry/2.0")
	req, err := h.router.Parse(r.URL.EscapedPath(), r.URL.RawQuery)
	if err != nil {
		var rerr *route.Error
		if errors.As(err, &rerr) {
			httpx.WriteError(w, rerr.Status(), rerr.Code, rerr.Message)
			return
		}
		httpx.WriteError(w, http.StatusBadRequest, "UNSUPPORTED", "invalid request")
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		// hosts.toml gives this mirror pull and resolve only; a push here is a mistake.
		w.Header().Set("Allow", "GET, HEAD")
		httpx.WriteError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "cove-node serves pulls only")
		return
	}
	if req.Kind == route.KindPing && req.Registry == "" {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, "{}")
		return
	}
	// A ranged GET goes the usual way, even when a prefill of the blob runs.
	if req.Kind == route.KindBlob && r.Method == http.MethodGet && h.cfg.Joinable != nil && r.Header.Get("Range") == "" {
		if f := h.cfg.Joinable(req.Registry, req.Repository, req.Digest, r.Header); f != nil {
			done, why := h.serveFill(w, r, req, f)
			f.Release()
			if done {
				return
			}
			if why != "" {
				// Waited on the prefill as long as on cove-cache itself: no second wait.
				h.fallBack(w, r, req, why)
				return
			}
		}
	}
	reason := "no-cache"
	for _, ep := range h.cachesFor(req) {
		if !ep.breaker.Allow() {
			reason = "breaker-open"
			continue
		}
		done, why := h.tryCache(w, r, req, ep)
		if done {
			return
		}
		reason = why
	}
	h.fallBack(w, r, req, reason)
}

// fallBack answers a request no cove-cache could serve, by the Fallback mode.
func (h *Handler) fallBack(w http.ResponseWriter, r *http.Request, req *route.Request, reason string) {
	if h.cfg.Fallback == FallbackHandoff && req.Registry != "" {
		// The origin is containerd's last host: a 5xx here sends containerd there at once.
		httpx.WriteError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "cove-cache unavailable ("+reason+"): fetch from the origin")
		h.cfg.Observe("handoff", reason, false)
		return
	}
	h.serveOrigin(w, r, req, reason)
}

// originPath is the distribution API path of req at its origin.
func originPath(req *route.Request) string {
	switch req.Kind {
	case route.KindManifest:
		ref := req.Tag
		if req.Digest != "" {
			ref = req.Digest.String()
		}
		return "/v2/" + req.Repository + "/manifests/" + ref
	case route.KindBlob:
		return "/v2/" + req.Repository + "/blobs/" + req.Digest.String()
	case route.KindTags:
		return "/v2/" + req.Repository + "/tags/list"
	case route.KindReferrers:
		return "/v2/" + req.Repository + "/referrers/" + req.Digest.String()
	}
	return "/v2/"
}
