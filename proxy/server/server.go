// Package server is cove-cache's HTTP front: the OCI distribution pull API over the
// storage driver, the fill manager and the origin client.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/cove-oci/cove/proxy/authz"
	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/fill"
	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/origin"
	"github.com/cove-oci/cove/proxy/route"
	"github.com/cove-oci/cove/proxy/storage"
	"github.com/cove-oci/cove/proxy/token"
)

// Config holds what a Server is built from.
type Config struct {
	// Storage is where verified blobs and records live.
	Storage storage.Driver
	// SpoolDir holds in-flight fills. Put it on the same filesystem as a filesystem store
	// so a verified fill is renamed into place, not copied.
	SpoolDir string
	// PlainHTTP lists origins (host:port) reached over plain HTTP.
	PlainHTTP []string
	// DefaultRegistry receives requests that name no registry (default docker.io).
	DefaultRegistry string
	// AuthzTTL is how long the origin's yes to a credential for a repository lets cached
	// objects of that repository be served without asking again (default 10 s; < 0:
	// never). A no is never remembered.
	AuthzTTL time.Duration
	// Offline is the policy when the origin cannot answer (unreachable or 5xx):
	// OfflineDeny (default) serves nothing cached; OfflineRecent serves a credential
	// whose allowance for the repository is younger than OfflineMaxAge, and resolves tags
	// to the last digest seen, marked stale.
	Offline       string
	OfflineMaxAge time.Duration
	// ReferrersTTL is how long a referrers list (GET /v2/<name>/referrers/<digest>) is
	// served again without asking the origin, to a credential with a fresh allowance in
	// the repository (default 10 s; < 0: never). A push through cove-cache of a manifest
	// naming the subject ends it at once.
	ReferrersTTL time.Duration
	// StallTimeout fails a fill whose origin sends nothing for this long (default 30 s).
	StallTimeout time.Duration
	// OriginPolicy decides which origins may be contacted: its zero value refuses
	// loopback, private, link-local, metadata and other non-public addresses. The PlainHTTP
	// origins are allowed on top of it. See docs/security.md.
	OriginPolicy origin.PolicyConfig
	// ExternalURL is the URL clients reach cove-cache at (scheme://host[:port]), used as
	// the realm of its token endpoint. Empty: taken from each request's Host.
	ExternalURL string
	// Reserve, when set, reserves room for every fill before it is spooled; a refusal
	// passes the blob through unstored (see fill.WithReserve). A pushed blob's room is
	// reserved when the origin has accepted it, before it is stored; a refusal leaves it
	// unstored (the push is not affected).
	Reserve fill.ReserveFunc
	// PassThroughWindow is the memory a fill whose blob the store cannot take keeps of
	// the body's most recent bytes for its clients (0: the fill package's 4 MiB).
	PassThroughWindow int
	// FillParallel is how many ranges of a blob of at least FillParallelMin bytes a fill
	// fetches from the origin at once, FillRangeSize bytes each (0: the fill package's
	// defaults: one stream, 16 MiB, 64 MiB). See fill.WithParallel.
	FillParallel    int
	FillRangeSize   int64
	FillParallelMin int64
	// UploadSessions bounds the blob upload sessions open at once (default 1024); a
	// push beyond it is answered 429 before the origin is asked.
	UploadSessions int
	// UploadMaxAge ends an upload session idle for this long (default 1 h; a session
	// lives at most 24 times this): its spooled bytes are removed and its handle is
	// unknown from then on.
	UploadMaxAge time.Duration
	// Cluster, when set, makes this server one replica of several on shared storage:
	// a blob miss goes to its owner replica (peer.go, docs/scaleout.md).
	Cluster *ClusterConfig
	// Transport overrides the origin transport (tests).
	Transport http.RoundTripper
	Logger    *slog.Logger
}

// Offline policies (Config.Offline).
const (
	OfflineDeny   = authz.OfflineDeny
	OfflineRecent = authz.OfflineRecent
)

// Server serves the distribution API.
type Server struct {
	store     storage.Driver
	router    route.Router
	origin    *origin.Client
	fills     *fill.Manager
	metrics   *metrics.Metrics
	authz     *authz.Authorizer
	tokens    *token.Broker
	uploads   *uploadTable
	referrers *referrersCache
	peers     *peering         // nil: a single replica
	pending   pendingStores    // pushed blobs being stored
	reserve   fill.ReserveFunc // room for a pushed blob before it is stored (nil: unbounded)

	listedChecks chan struct{} // slots for checkListed
	log          *slog.Logger
	mux          *http.ServeMux
	draining     atomic.Pointer[drainState] // set once by Drain (drain.go)
}

// New builds a Server.
func New(cfg Config) (*Server, error) {
	if cfg.Storage == nil {
		return nil, errors.New("server: no storage driver")
	}
	if cfg.SpoolDir == "" {
		return nil, errors.New("server: no spool directory")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.StallTimeout == 0 {
		cfg.StallTimeout = 30 * time.Second
	}
	s := &Server{
		store:        cfg.Storage,
		router:       route.Router{DefaultRegistry: cfg.DefaultRegistry},
		listedChecks: make(chan struct{}, maxListedChecks),
		referrers:    newReferrersCache(cfg.ReferrersTTL),
		log:          cfg.Logger,
	}
	az, err := authz.New(authz.Config{
		TTL:           cfg.AuthzTTL,
		Offline:       cfg.Offline,
		OfflineMaxAge: cfg.OfflineMaxAge,
		Records:       cfg.Storage,
		OnRecordError: func(op string, err error) {
			s.log.Warn("membership record failed", "operation", op, "error", err)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("server: %w", err)
	}
	s.authz = az
	var fills *fill.Manager
	s.metrics = metrics.New(func() int {
		if fills == nil {
			return 0
		}
		return fills.InFlight()
	})
	policy, err := origin.NewPolicy(cfg.OriginPolicy)
	if err != nil {
		return nil, err
	}
	opts := []origin.Option{
		origin.WithPlainHTTP(cfg.PlainHTTP...),
		origin.WithObserver(s.metrics.OriginRequest),
		origin.WithPolicy(policy),
		origin.WithRefused(func(registry string, rerr *origin.RefusedError) {
			s.metrics.OriginRefusal(rerr.Reason)
			args := []any{"registry", registry, "host", rerr.Host, "reason", rerr.Reason}
			if rerr.Addr.IsValid() {
				args = append(args, "address", rerr.Addr.String())
			}
			s.log.Warn("origin refused by policy", args...)
		}),
	}
	if cfg.Transport != nil {
		opts = append(opts, origin.WithTransport(cfg.Transport))
	}
	s.origin = origin.New(opts...)
	s.tokens = token.New(token.Config{
		Router:      s.router,
		Origin:      s.origin,
		Metrics:     s.metrics,
		Logger:      cfg.Logger,
		ExternalURL: cfg.ExternalURL,
	})
	fillOpts := []fill.Option{
		fill.WithStallTimeout(cfg.StallTimeout),
		fill.WithLogger(cfg.Logger),
		fill.WithOriginBytes(s.metrics.FromOrigin),
		fill.WithDone(s.fillDone),
		fill.WithEvents(fill.Events{
			StoreError:  s.metrics.StoreError,
			PassThrough: s.metrics.PassThrough,
			ReaderCut:   s.metrics.ReaderCut,
			Resume:      s.metrics.FillResume,
			Condition:   s.metrics.StoreCondition,
		}),
	}
	if cfg.Reserve != nil {
		s.reserve = cfg.Reserve
		fillOpts = append(fillOpts, fill.WithReserve(cfg.Reserve))
	}
	if cfg.PassThroughWindow > 0 {
		fillOpts = append(fillOpts, fill.WithPassThroughWindow(cfg.PassThroughWindow))
	}
	if cfg.FillParallel > 0 {
		fillOpts = append(fillOpts, fill.WithParallel(cfg.FillParallel))
	}
	if cfg.FillRangeSize > 0 {
		fillOpts = append(fillOpts, fill.WithRangeSize(cfg.FillRangeSize))
	}
	if cfg.FillParallelMin > 0 {
		fillOpts = append(fillOpts, fill.WithParallelMin(cfg.FillParallelMin))
	}
	fills, err = fill.NewManager(filepath.Clean(cfg.SpoolDir), s.commitFill, fillOpts...)
	if err != nil {
		return nil, err
	}
	s.fills = fills
	// After the fill manager: it empties the spool directory at start, leftovers of
	// upload sessions of a previous run included.
	if s.uploads, err = newUploadTable(filepath.Join(filepath.Clean(cfg.SpoolDir), "uploads"), cfg.UploadSessions, cfg.UploadMaxAge); err != nil {
		return nil, fmt.Errorf("server: upload spool: %w", err)
	}

	if cfg.Cluster != nil {
		if err := s.startPeering(cfg.Cluster, filepath.Clean(cfg.SpoolDir), cfg.StallTimeout); err != nil {
			return nil, err
		}
	}

	s.mux = http.NewServeMux()
	s.mux.HandleFunc("/v2/", s.serveDistribution)
	s.mux.HandleFunc("/v2", s.serveDistribution)
	s.mux.Handle(token.Path, s.tokens)
	s.mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics.Registry, promhttp.HandlerOpts{}))
	s.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	s.mux.HandleFunc("GET /readyz", s.serveReady)
	s.mux.HandleFunc("POST "+noticePath, s.serveNotice)
	s.mux.HandleFunc("POST "+reservePath, s.serveReserve)
	s.mux.HandleFunc("POST "+releasePath, s.serveRelease)
	return s, nil
}

// Metrics exposes the collectors (tests read them).
func (s *Server) Metrics() *metrics.Metrics { return s.metrics }

// UploadSessions is the number of blob upload sessions open (tests).
func (s *Server) UploadSessions() int { return s.uploads.len() }

// Fills exposes the fill manager (tests wait for fills to settle).
func (s *Server) Fills() *fill.Manager { return s.fills }

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if cluster.IsPeerRequest(r) {
		var ok bool
		if r, ok = s.acceptPeer(w, r); !ok {
			return
		}
	}
	if s.refuseWhileClosing(w, r) {
		return // a draining replica past its grace serves only its fills' joiners
	}
	s.mux.ServeHTTP(w, r)
}

// serveReady answers 200 when storage answers. A store that cannot take blobs (full,
// failing) still answers 200, with a body naming the condition: the replica serves its
// hits and passes fills through, which is better than no replica; the condition is for
// people and alerts (cove_store_degraded), not for taking the replica out of service.
func (s *Server) serveReady(w http.ResponseWriter, r *http.Request) {
	if s.serveDraining(w) {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	if _, err := s.store.GetRecord(ctx, "readyz-probe"); err != nil && !isNotFound(err) {
		http.Error(w, "storage not ready", http.StatusServiceUnavailable)
		return
	}
	if cond, degraded := s.fills.StoreDegraded(); degraded {
		fmt.Fprintf(w, "ok, store degraded: cannot take blobs (%s: %s) since %s; fills pass through unstored\n",
			cond.Op, cond.Reason, cond.Since.UTC().Format(time.RFC3339))
		return
	}
	fmt.Fprintln(w, "ok")
}

func (s *Server) serveDistribution(w http.ResponseWriter, r *http.Request) {
	if s.log.Enabled(r.Context(), slog.LevelDebug) {
		rec := &recorder{ResponseWriter: w}
		start := time.Now()
		defer func() {
			s.logRequest(r, rec, start)
			if p := recover(); p != nil {
				panic(p) // http.ErrAbortHandler: the log line is written, the abort goes on
			}
		}()
		w = rec
	}
	w.Header().Set("Docker-Distribution-Api-Version", "registry/2.0")
	req, err := s.router.Parse(r.URL.EscapedPath(), r.URL.RawQuery)
	if err != nil {
		s.metrics.Request("unknown", metrics.ResultInvalid)
		var rerr *route.Error
		if errors.As(err, &rerr) {
			httpx.WriteError(w, rerr.Status(), rerr.Code, rerr.Message)
			return
		}
		httpx.WriteError(w, http.StatusBadRequest, "UNSUPPORTED", "invalid request")
		return
	}
	push := req.Kind == route.KindUpload || req.Kind == route.KindManifest && r.Method == http.MethodPut
	del := r.Method == http.MethodDelete && (req.Kind == route.KindManifest || req.Kind == route.KindBlob)
	if !push && !del && r.Method != http.MethodGet && r.Method != http.MethodHead {
		s.metrics.Request(req.Kind.String(), metrics.ResultInvalid)
		switch req.Kind {
		case route.KindManifest:
			w.Header().Set("Allow", "GET, HEAD, PUT, DELETE")
		case route.KindBlob:
			w.Header().Set("Allow", "GET, HEAD, DELETE")
		default:
			w.Header().Set("Allow", "GET, HEAD")
		}
		httpx.WriteError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "method not supported by cove-cache")
		return
	}
	if req.ViaNamespace {
		w.Header().Set("Oci-Namespace", req.Registry)
	} else {
		r = s.tokens.WithClientChallenge(r, req)
	}
	if !s.tokens.BindCredential(w, r, req) {
		return
	}
	if push {
		s.servePush(w, r, req)
		return
	}
	if del {
		s.serveDelete(w, r, req)
		return
	}
	switch req.Kind {
	case route.KindPing:
		s.servePing(w, r, req)
	case route.KindBlob:
		s.serveBlob(w, r, req)
	case route.KindManifest:
		s.serveManifest(w, r, req)
	case route.KindTags:
		s.servePassthrough(w, r, req)
	case route.KindReferrers:
		s.serveReferrers(w, r, req)
	}
}
