// Command cove-node is the cove agent beside containerd on every node: the resolver hook
// (containerd's _default registry mirror on loopback) with fast fallback to the origin,
// and, with --content-socket, the content hook (containerd's content store and differ as
// proxy plugins) with prefill.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/cove-oci/cove/internal/cli"
	"github.com/cove-oci/cove/internal/version"
	"github.com/cove-oci/cove/plugin/content"
	"github.com/cove-oci/cove/plugin/mirror"
	"github.com/cove-oci/cove/plugin/node"
	"github.com/cove-oci/cove/proxy/route"
)

const usage = `cove-node: the cove agent beside containerd on every node.

Usage:
  cove-node serve [flags]                    run the hooks (see 'cove-node serve -h')
  cove-node print-containerd-config [flags]  print the containerd config fragment for the content hook
  cove-node install [flags]                  install cove-node beside this node's containerd (see 'cove-node install -h')
  cove-node uninstall [flags]                put every file the install changed back as it was
  cove-node doctor [flags]                   check that this node's containerd pulls through cove-node
  cove-node version                          print the version
`

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "serve":
		return serve(args[1:], stderr)
	case "print-containerd-config":
		return printConfig(args[1:], stdout, stderr)
	case "install":
		return installCmd(args[1:], stdout, stderr)
	case "uninstall":
		return uninstallCmd(args[1:], stdout, stderr)
	case "doctor":
		return doctorCmd(args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, "cove-node", version.Version)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "cove-node: unknown command %q\n\n%s", args[0], usage)
	return 2
}

type options struct {
	addr          string
	metricsAddr   string
	caches        cli.Repeated
	root          string
	contentSocket string
	contentRoot   string
	containerd    string
	plainHTTP     cli.Repeated
	cfg           mirror.Config
	logLevel      string
	logFormat     string
	cacheCA       string
	slices        sliceOptions
}

func parseServe(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("cove-node serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.addr, "addr", "127.0.0.1:5006", "loopback `HOST:PORT` of the resolver hook (containerd's _default mirror)")
	fs.StringVar(&o.metricsAddr, "metrics-addr", "", "also serve /metrics (and /healthz), and nothing else, on `HOST:PORT`, which may be off loopback for Prometheus (0.0.0.0 binds every interface); empty: /metrics on --addr only")
	fs.Var(&o.caches, "cache", "cove-cache base `URL` (repeatable: several are replicas of one cove-cache, their --advertise-url; each blob goes to the one that owns it, then the next in rank)")
	o.slices.register(fs)
	fs.StringVar(&o.cacheCA, "cache-ca", "", "PEM bundle `FILE` of the CA certificates that verify https:// --cache URLs, used instead of the system roots")
	fs.StringVar(&o.root, "root", "/var/lib/cove-node", "state `DIR`")
	fs.StringVar(&o.contentSocket, "content-socket", "", "unix socket `PATH` of the content hook; empty: mirror-only mode")
	fs.StringVar(&o.contentRoot, "content-root", defaultContentRoot, "the content store `DIR` the content hook serves: containerd's built-in store's own directory")
	fs.StringVar(&o.containerd, "containerd-address", "/run/containerd/containerd.sock", "containerd's gRPC `SOCKET` (the differ writes diffs through it)")
	fs.Var(&o.plainHTTP, "origin-plain-http", "reach this origin `HOST:PORT` over plain HTTP when falling back (repeatable)")
	fs.DurationVar(&o.cfg.ConnectTimeout, "connect-timeout", 300*time.Millisecond, "bound on connecting to cove-cache")
	fs.DurationVar(&o.cfg.HeaderTimeout, "header-timeout", 2*time.Second, "wait for cove-cache's response headers before probing its health")
	fs.DurationVar(&o.cfg.StallTimeout, "stall-timeout", 5*time.Second, "wait for body bytes before probing cove-cache's health")
	fs.DurationVar(&o.cfg.SlowOriginTimeout, "slow-origin-timeout", 25*time.Second, "longest wait on a healthy cove-cache whose origin is slow")
	fs.DurationVar(&o.cfg.ProbeTimeout, "probe-timeout", 300*time.Millisecond, "bound on one health probe of cove-cache")
	fs.StringVar(&o.cfg.Fallback, "fallback", mirror.FallbackHandoff, "when cove-cache cannot serve a request: handoff (answer 503, containerd fetches from the origin itself) or relay (cove-node fetches and relays)")
	fs.DurationVar(&o.cfg.ProbeInterval, "probe-interval", time.Second, "background health check of each cove-cache")
	fs.DurationVar(&o.cfg.ProbeAfter, "probe-after", 250*time.Millisecond, "first health probe of cove-cache once headers or body bytes are this late")
	fs.DurationVar(&o.cfg.AroundCacheWindow, "around-cache-window", 10*time.Second, "a 401 to a manifest request not followed by a success for its repository within this window counts as a pull that went round the cache (cove_node_pulls_around_cache_total)")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.logFormat, "log-format", "json", "json or text")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	host, _, err := net.SplitHostPort(o.addr)
	if err != nil {
		return nil, fmt.Errorf("--addr %q: want HOST:PORT: %v", o.addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return nil, fmt.Errorf("--addr %q: the resolver hook serves this node's containerd only: use a loopback address", o.addr)
	}
	if o.metricsAddr != "" {
		if err := node.CheckMetricsAddr(o.metricsAddr); err != nil {
			return nil, fmt.Errorf("--metrics-addr: %v", err)
		}
		if o.metricsAddr == o.addr {
			return nil, fmt.Errorf("--metrics-addr %q is --addr: give the metrics listener its own port", o.metricsAddr)
		}
	}
	for _, c := range o.caches {
		u, err := url.Parse(c)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
			return nil, fmt.Errorf("--cache %q: want http(s)://HOST:PORT", c)
		}
	}
	if err := o.slices.check(); err != nil {
		return nil, err
	}
	for i, h := range o.plainHTTP {
		norm, err := route.NormalizeHost(h)
		if err != nil || strings.Contains(h, "/") {
			return nil, fmt.Errorf("--origin-plain-http %q: want a registry HOST:PORT", h)
		}
		o.plainHTTP[i] = norm
	}
	if o.contentSocket != "" && (!filepath.IsAbs(o.contentSocket) || !filepath.IsAbs(o.contentRoot)) {
		return nil, errors.New("--content-socket and --content-root must be absolute paths")
	}
	for name, d := range map[string]time.Duration{
		"--connect-timeout": o.cfg.ConnectTimeout, "--header-timeout": o.cfg.HeaderTimeout, "--stall-timeout": o.cfg.StallTimeout,
		"--slow-origin-timeout": o.cfg.SlowOriginTimeout, "--probe-timeout": o.cfg.ProbeTimeout, "--probe-after": o.cfg.ProbeAfter, "--probe-interval": o.cfg.ProbeInterval,
		"--around-cache-window": o.cfg.AroundCacheWindow,
	} {
		if d <= 0 {
			return nil, fmt.Errorf("%s must be positive", name)
		}
	}
	if o.cfg.Fallback != mirror.FallbackHandoff && o.cfg.Fallback != mirror.FallbackRelay {
		return nil, fmt.Errorf("--fallback %q: want handoff or relay", o.cfg.Fallback)
	}
	if o.cfg.SlowOriginTimeout < o.cfg.HeaderTimeout {
		return nil, errors.New("--slow-origin-timeout must not be shorter than --header-timeout")
	}
	if o.cacheCA != "" {
		pool, err := loadCAPool(o.cacheCA)
		if err != nil {
			return nil, fmt.Errorf("--cache-ca %q: %v", o.cacheCA, err)
		}
		o.cfg.TLSConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	o.cfg.Caches = o.caches
	o.cfg.PlainHTTP = o.plainHTTP
	return o, nil
}

// loadCAPool reads a PEM bundle of CA certificates; a bundle with none is an error (an
// empty pool would fail every handshake, far from its cause).
func loadCAPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	n := 0
	for rest := b; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %v", n+1, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, errors.New("no PEM CERTIFICATE block in the file")
	}
	return pool, nil
}

func serve(args []string, stderr io.Writer) int {
	o, err := parseServe(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "cove-node serve: %v\n", err)
		return 2
	}
	log, err := cli.NewLogger(o.logLevel, o.logFormat, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "cove-node serve: %v\n", err)
		return 2
	}
	if err := os.MkdirAll(o.root, 0o750); err != nil {
		log.Error("creating state directory failed", "root", o.root, "error", err)
		return 1
	}
	members, err := o.slices.membership(o.caches, log)
	if err != nil {
		log.Error("reading the cove-cache replicas from the Kubernetes API is impossible", "error", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if members != nil {
		o.cfg.Members = members
		go func() {
			if err := members.Run(ctx); err != nil {
				log.Error("cove-cache membership stopped: requests go to the last replicas seen or the --cache URLs", "error", err)
			}
		}()
	}
	ncfg := node.Config{Addr: o.addr, MetricsAddr: o.metricsAddr, Mirror: o.cfg, Logger: log}
	if o.contentSocket != "" {
		ncfg.Content = content.Config{Root: o.contentRoot, Socket: o.contentSocket, ContainerdAddress: o.containerd}
	}
	agent, err := node.Start(ctx, ncfg)
	if err != nil {
		log.Error("starting cove-node failed", "error", err)
		return 1
	}
	log.Info("cove-node serving", "addr", agent.Addr, "metrics_addr", agent.MetricsAddr, "content_socket", agent.ContentSocket, "version", version.Version)
	go checkCacheTLS(ctx, log, o.caches, o.cfg.TLSConfig, o.cfg.ConnectTimeout)
	<-ctx.Done()
	log.Info("shutting down")
	agent.Close()
	return 0
}

// checkCacheTLS makes one TLS handshake with each https:// cache at start and logs a
// certificate that does not verify, with the reason: the health probes that then keep the
// cache bypassed only say it is unhealthy. A cache that is not up yet is not reported.
func checkCacheTLS(ctx context.Context, log *slog.Logger, caches []string, cfg *tls.Config, connectTimeout time.Duration) {
	for _, c := range caches {
		u, err := url.Parse(c)
		if err != nil || u.Scheme != "https" {
			continue
		}
		host := u.Host
		if u.Port() == "" {
			host = net.JoinHostPort(u.Hostname(), "443")
		}
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if cfg != nil {
			tc = cfg.Clone()
		}
		tc.ServerName = u.Hostname()
		d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: connectTimeout}, Config: tc}
		hctx, cancel := context.WithTimeout(ctx, connectTimeout+2*time.Second)
		conn, err := d.DialContext(hctx, "tcp", host)
		cancel()
		if err == nil {
			conn.Close()
			continue
		}
		var verr *tls.CertificateVerificationError
		if errors.As(err, &verr) {
			log.Error("cove-cache's TLS certificate does not verify (check --cache-ca and the certificate's names): pulls will go to the origin",
				"cache", c, "error", err)
		} else {
			log.Debug("TLS check of cove-cache failed", "cache", c, "error", err)
		}
	}
}

const defaultContentRoot = "/var/lib/containerd/io.containerd.content.v1.content"

// printConfig prints the containerd config (version 3) fragment that switches the
// content hook on: the built-in content store off, cove's content store and differ as
// proxy plugins, and the transfer service's unpack through cove's differ. The install
// script puts it in a drop-in the root config imports.
func printConfig(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("cove-node print-containerd-config", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("content-socket", "/run/cove-node/content.sock", "unix socket `PATH` of the content hook")
	fs.String("root", "/var/lib/cove-node", "cove-node's state `DIR` (accepted for symmetry with serve; the fragment does not depend on it)")
	arch := fs.String("arch", runtime.GOARCH, "the node's `ARCH` for the unpack platform")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "cove-node print-containerd-config: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if !filepath.IsAbs(*socket) || strings.ContainsAny(*socket, "\"'\n") {
		fmt.Fprintf(stderr, "cove-node print-containerd-config: --content-socket %q: want an absolute path\n", *socket)
		return 2
	}
	fmt.Fprint(stdout, content.Fragment(*socket, *arch))
	return 0
}
