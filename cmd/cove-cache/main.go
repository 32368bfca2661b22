// Command cove-cache is the cluster cache service: an OCI distribution pull-through cache
// for any registry, which every node's containerd uses as its mirror.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cove-oci/cove/internal/cli"
	"github.com/cove-oci/cove/internal/tlsreload"
	"github.com/cove-oci/cove/internal/version"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/origin"
	"github.com/cove-oci/cove/proxy/route"
	"github.com/cove-oci/cove/proxy/server"
)

const usage = `cove-cache: a cluster-wide pull-through cache for container images and OCI artifacts.

Usage:
  cove-cache serve [flags]   run the cache (see 'cove-cache serve -h')
  cove-cache preheat --cache URL [flags] REF...
                             fill a running cache ahead of use (see 'cove-cache preheat -h')
  cove-cache version         print the version
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "serve":
		return serve(args[1:], stderr)
	case "preheat":
		return runPreheat(args[1:], os.Stdin, stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, "cove-cache", version.Version)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "cove-cache: unknown command %q\n\n%s", args[0], usage)
	return 2
}

type options struct {
	addr            string
	storageDir      string
	plainHTTP       cli.Repeated
	originAllow     cli.Repeated
	originDeny      cli.Repeated
	defaultRegistry string
	externalURL     string
	authzTTL        time.Duration
	referrersTTL    time.Duration
	stallTimeout    time.Duration
	uploadSessions  int
	uploadMaxAge    time.Duration
	offline         string
	offlineMaxAge   time.Duration
	logLevel        string
	logFormat       string
	tlsCert         string
	tlsKey          string
	s3              s3Options
	bound           boundOptions
	fill            fillOptions
	peer            peerOptions
	drain           drainOptions
	config          string
}

func defaultStorageDir() string {
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "cove-cache")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "share", "cove-cache")
	}
	return "cove-cache-data"
}

func parseServe(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("cove-cache serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.addr, "addr", "127.0.0.1:5005", "listen address `HOST:PORT`")
	fs.StringVar(&o.storageDir, "storage-dir", defaultStorageDir(), "filesystem storage `DIR` (blobs, records, in-flight fills)")
	fs.Var(&o.plainHTTP, "origin-plain-http", "reach this origin `HOST:PORT` over plain HTTP (repeatable; for local test registries)")
	fs.Var(&o.originAllow, "origin-allow", "let cove-cache contact origins matching `PATTERN` (repeatable): a host glob (*.corp.example, registry.local:5000) matched against the registry name, or a CIDR (10.20.0.0/16) matched against the address dialled; loopback, private, link-local and metadata addresses are refused unless allowed")
	fs.Var(&o.originDeny, "origin-deny", "never contact origins matching `PATTERN` (repeatable; same forms as --origin-allow); deny wins over allow")
	fs.StringVar(&o.defaultRegistry, "default-registry", route.DockerHub, "registry for requests that name none (no ns= and no registry path prefix)")
	fs.DurationVar(&o.authzTTL, "authz-ttl", 10*time.Second, "how long the origin's yes to a credential for a repository lets its cached objects be served without asking; 0 asks every time")
	fs.DurationVar(&o.referrersTTL, "referrers-ttl", 10*time.Second, "how long a referrers list is served again without asking the origin (to a credential it allowed in the repository within --authz-ttl); 0 asks every time")
	fs.StringVar(&o.offline, "offline", server.OfflineDeny, "when the origin cannot answer: deny (serve nothing cached) or recent (serve credentials allowed within --offline-max-age; tags resolve to the last digest seen, marked stale)")
	fs.DurationVar(&o.offlineMaxAge, "offline-max-age", time.Hour, "with --offline recent: the oldest allowance that still serves")
	fs.DurationVar(&o.stallTimeout, "stall-timeout", 30*time.Second, "fail an origin fill that sends no byte for this long")
	fs.IntVar(&o.uploadSessions, "upload-sessions", 1024, "most blob upload sessions (pushes) open at once; a push beyond gets 429")
	fs.DurationVar(&o.uploadMaxAge, "upload-max-age", time.Hour, "end a blob upload session idle this long (a session lives at most 24 times this)")
	fs.StringVar(&o.externalURL, "external-url", "", "the `URL` clients reach cove-cache at (https://cove.example:5005), the realm of its token endpoint for clients that name the registry in the path; default: from each request's scheme and Host")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "json", "json or text")
	fs.StringVar(&o.tlsCert, "tls-cert", "", "serve HTTPS with this PEM certificate (chain) `FILE`, reloaded when it changes; needs --tls-key")
	fs.StringVar(&o.tlsKey, "tls-key", "", "PEM private key `FILE` of --tls-cert, reloaded when it changes")
	o.s3.register(fs)
	o.bound.register(fs)
	o.fill.register(fs)
	o.peer.register(fs)
	o.drain.register(fs)
	fs.StringVar(&o.config, "config", "", "read settings from this TOML `FILE`: its keys are these flags with _ for - (storage_max_size = \"500GiB\", pin = [\"...\"]); flags on the command line win")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if o.config != "" {
		if err := applyConfig(fs, o.config); err != nil {
			return nil, err
		}
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if _, _, err := net.SplitHostPort(o.addr); err != nil {
		return nil, fmt.Errorf("--addr %q: want HOST:PORT: %v", o.addr, err)
	}
	if (o.tlsCert == "") != (o.tlsKey == "") {
		return nil, errors.New("--tls-cert and --tls-key go together: give both to serve HTTPS, or neither for plain HTTP")
	}
	if o.storageDir == "" {
		return nil, errors.New("--storage-dir must not be empty")
	}
	if err := o.s3.validate(); err != nil {
		return nil, err
	}
	if err := o.bound.validate(o.s3.endpoint != ""); err != nil {
		return nil, err
	}
	if err := o.fill.validate(); err != nil {
		return nil, err
	}
	if err := o.peer.validate(o.s3.endpoint != ""); err != nil {
		return nil, err
	}
	if err := o.drain.validate(); err != nil {
		return nil, err
	}
	for i, h := range o.plainHTTP {
		norm, err := route.NormalizeHost(h)
		if err != nil || strings.Contains(h, "/") {
			return nil, fmt.Errorf("--origin-plain-http %q: want a registry HOST:PORT", h)
		}
		o.plainHTTP[i] = norm
	}
	for _, rule := range []struct {
		flag     string
		patterns []string
	}{{"--origin-allow", o.originAllow}, {"--origin-deny", o.originDeny}} {
		for _, p := range rule.patterns {
			if _, err := origin.ParsePattern(p); err != nil {
				return nil, fmt.Errorf("%s %q: want a host glob, HOST:PORT or a CIDR: %v", rule.flag, p, err)
			}
		}
	}
	if o.externalURL != "" {
		u, err := url.Parse(o.externalURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil ||
			(u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
			return nil, fmt.Errorf("--external-url %q: want http(s)://HOST[:PORT] and nothing more", o.externalURL)
		}
	}
	def, err := route.NormalizeHost(o.defaultRegistry)
	if err != nil {
		return nil, fmt.Errorf("--default-registry %q: not a registry host", o.defaultRegistry)
	}
	o.defaultRegistry = def
	if o.offline != server.OfflineDeny && o.offline != server.OfflineRecent {
		return nil, fmt.Errorf("--offline %q: want deny or recent", o.offline)
	}
	if o.offlineMaxAge <= 0 {
		return nil, errors.New("--offline-max-age must be positive")
	}
	if o.uploadSessions < 1 || o.uploadMaxAge <= 0 {
		return nil, errors.New("--upload-sessions and --upload-max-age must be positive")
	}
	if o.authzTTL < 0 || o.referrersTTL < 0 || o.stallTimeout <= 0 {
		return nil, errors.New("--authz-ttl and --referrers-ttl must be >= 0 and --stall-timeout > 0")
	}
	return o, nil
}

func serve(args []string, stderr io.Writer) int {
	o, err := parseServe(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "cove-cache serve: %v\n", err)
		return 2
	}
	log, err := cli.NewLogger(o.logLevel, o.logFormat, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "cove-cache serve: %v\n", err)
		return 2
	}
	clusterCfg, err := o.peer.clusterConfig(log)
	if err != nil {
		log.Error("scale-out configuration unusable", "error", err)
		return 1
	}
	opened, ok := openStorage(context.Background(), o, log)
	if !ok {
		return 1
	}
	defer opened.closer.Close()
	freeDir := ""
	if o.s3.endpoint == "" {
		freeDir = o.storageDir
	}
	storeMetrics := metrics.NewStore()
	store, err := o.bound.wrap(opened.store, freeDir, o.peer.sharedEviction(clusterCfg), storeMetrics, log)
	if err != nil {
		log.Error("bounding storage failed", "error", err)
		return 1
	}
	store.Start(context.Background())
	defer func() {
		if err := store.Close(context.Background()); err != nil {
			log.Warn("writing the eviction index at shutdown failed", "error", err)
		}
	}()
	authzTTL := o.authzTTL
	if authzTTL == 0 {
		authzTTL = -1 // Config's zero means the default; the flag's zero means never reuse
	}
	referrersTTL := o.referrersTTL
	if referrersTTL == 0 {
		referrersTTL = -1
	}
	if clusterCfg != nil {
		clusterCfg.Reservations = store // while it leads shared eviction
	}
	srv, err := server.New(server.Config{
		Storage:         store,
		Reserve:         store.Reserve,
		SpoolDir:        opened.spoolDir,
		PlainHTTP:       o.plainHTTP,
		DefaultRegistry: o.defaultRegistry,
		ExternalURL:     o.externalURL,
		AuthzTTL:        authzTTL,
		ReferrersTTL:    referrersTTL,
		StallTimeout:    o.stallTimeout,
		FillParallel:    o.fill.parallel,
		FillRangeSize:   o.fill.rangeBytes,
		FillParallelMin: o.fill.minBytes,
		UploadSessions:  o.uploadSessions,
		UploadMaxAge:    o.uploadMaxAge,
		Offline:         o.offline,
		OfflineMaxAge:   o.offlineMaxAge,
		// The policy also refuses cove-cache's own listen address (its port included).
		OriginPolicy: origin.PolicyConfig{Allow: o.originAllow, Deny: o.originDeny, Self: []string{o.addr}},
		Cluster:      clusterCfg,
		Logger:       log,
	})
	if err != nil {
		log.Error("starting server failed", "error", err)
		return 1
	}
	if err := storeMetrics.Register(srv.Metrics().Registry); err != nil {
		log.Error("registering store metrics failed", "error", err)
		return 1
	}
	if link := srv.ReservationLink(); link != nil {
		store.SetLeaderLink(link) // a follower asks the leader for room (docs/scaleout.md)
	}
	var reloader *tlsreload.Reloader
	if o.tlsCert != "" {
		reloader, err = tlsreload.New(o.tlsCert, o.tlsKey, tlsreload.WithLogger(log))
		if err != nil {
			log.Error("TLS certificate unusable (--tls-cert, --tls-key)", "tls_cert", o.tlsCert, "tls_key", o.tlsKey, "error", err)
			return 1
		}
	}
	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		log.Error("listen failed", "addr", o.addr, "error", err)
		return 1
	}
	hs := &http.Server{
		Handler:           srv,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	// Membership runs until the process ends, the drain included: a draining replica
	// still routes the misses it serves to their owners.
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	if clusterCfg != nil {
		go func() {
			if err := clusterCfg.Membership.Run(ctx); err != nil && ctx.Err() == nil {
				log.Error("membership stopped: owners are computed from the last members seen", "error", err)
			}
		}()
	}
	errc := make(chan error, 1)
	scheme := "http"
	if reloader != nil {
		// The certificate comes from GetCertificate, which re-reads rotated files.
		hs.TLSConfig = reloader.ServerConfig()
		scheme = "https"
		cur := reloader.Current().Leaf
		log.Info("TLS enabled", "tls_cert", o.tlsCert, "serial", cur.SerialNumber.String(), "not_after", cur.NotAfter)
		go func() { errc <- hs.ServeTLS(ln, "", "") }()
	} else {
		go func() { errc <- hs.Serve(ln) }()
	}
	attrs := append([]any{"addr", ln.Addr().String(), "scheme", scheme, "version", version.Version}, opened.attrs...)
	if clusterCfg != nil {
		attrs = append(attrs, "advertise_url", clusterCfg.Self, "peers", clusterCfg.Membership.Members())
	}
	log.Info("cove-cache serving", attrs...)
	if clusterCfg != nil {
		// A replica started again where one drained is an owner again at once.
		go srv.AnnounceServing(ctx)
	}
	var first os.Signal
	select {
	case err := <-errc:
		log.Error("server stopped", "error", err)
		return 1
	case first = <-sigs:
	}
	if !drain(hs, srv, o.drain, first, sigs, errc, log) {
		return 1
	}
	return 0
}
