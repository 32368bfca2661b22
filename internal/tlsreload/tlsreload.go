// Package tlsreload serves a TLS certificate and key pair from files and picks up new
// files without a restart: certificate rotation by cert-manager, a Kubernetes secret
// volume (which swaps a symlink to a new directory atomically) or anything else that
// rewrites or renames the files in place.
//
// The files are checked on TLS handshakes, at most once per check interval (1 s): both
// files (a few KB) are read and compared with the version last tried, and parsed only
// when either changed. Comparing contents rather than modification times and sizes also
// sees a rewrite of the same size within the file system's timestamp granularity, and a
// rename or symlink swap, since the paths are opened anew each time. A new pair that does
// not load (a half-written file, a key that does not match the certificate) is logged
// once and the previous certificate keeps being served; the next change to either file
// is tried again.
package tlsreload

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// DefaultCheckInterval is how often, at most, handshakes look at the files.
const DefaultCheckInterval = time.Second

// Reloader holds the current certificate of a cert/key file pair.
type Reloader struct {
	certFile, keyFile string
	log               *slog.Logger
	interval          time.Duration
	now               func() time.Time

	mu        sync.Mutex
	cert      *tls.Certificate
	certPEM   []byte // the version of the files last tried, good or bad
	keyPEM    []byte
	lastErr   string // the last reload error logged
	lastCheck time.Time
}

// Option configures a Reloader.
type Option func(*Reloader)

// WithCheckInterval sets how often, at most, the files are stat'ed (default 1 s; 0: on
// every handshake).
func WithCheckInterval(d time.Duration) Option { return func(r *Reloader) { r.interval = d } }

// WithLogger sets the logger for reloads and reload failures (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(r *Reloader) { r.log = l } }

// New loads the pair once and fails if it does not load: a server must not start without
// a usable certificate.
func New(certFile, keyFile string, opts ...Option) (*Reloader, error) {
	if certFile == "" || keyFile == "" {
		return nil, errors.New("tlsreload: both a certificate file and a key file are needed")
	}
	r := &Reloader{certFile: certFile, keyFile: keyFile, interval: DefaultCheckInterval, now: time.Now}
	for _, o := range opts {
		o(r)
	}
	if r.log == nil {
		r.log = slog.Default()
	}
	certPEM, keyPEM, err := r.read()
	if err != nil {
		return nil, fmt.Errorf("reading TLS certificate and key: %w", err)
	}
	cert, err := parse(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("loading TLS certificate %s and key %s: %w", certFile, keyFile, err)
	}
	r.cert, r.certPEM, r.keyPEM, r.lastCheck = cert, certPEM, keyPEM, r.now()
	return r, nil
}

// ServerConfig returns a server tls.Config serving the current certificate, TLS 1.2 and
// later.
func (r *Reloader) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: r.GetCertificate,
	}
}

// GetCertificate is tls.Config.GetCertificate: the current certificate, reloaded first if
// the files changed since the last check (at most once per check interval).
func (r *Reloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if now := r.now(); now.Sub(r.lastCheck) >= r.interval {
		r.lastCheck = now
		r.checkLocked()
	}
	return r.cert, nil
}

// Check looks at the files now, regardless of the check interval, and reloads them if
// they changed. It returns the error of a failed reload (the old certificate stays).
func (r *Reloader) Check() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lastCheck = r.now()
	return r.checkLocked()
}

// Current returns the certificate being served.
func (r *Reloader) Current() *tls.Certificate {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cert
}

func (r *Reloader) checkLocked() error {
	certPEM, keyPEM, err := r.read()
	if err == nil && bytes.Equal(certPEM, r.certPEM) && bytes.Equal(keyPEM, r.keyPEM) {
		return nil // unchanged (or changed to a version already tried)
	}
	if err == nil {
		// Whatever comes of it, this version of the files has been tried: a bad pair is
		// logged once, and the next write to either file is tried again.
		r.certPEM, r.keyPEM = certPEM, keyPEM
		var cert *tls.Certificate
		if cert, err = parse(certPEM, keyPEM); err == nil {
			r.cert, r.lastErr = cert, ""
			r.log.Info("TLS certificate reloaded", "tls_cert", r.certFile,
				"serial", cert.Leaf.SerialNumber.String(), "not_after", cert.Leaf.NotAfter)
			return nil
		}
		err = fmt.Errorf("loading TLS certificate %s and key %s: %w", r.certFile, r.keyFile, err)
	}
	// A file missing for a moment (between an unlink and a rename), half written, or a
	// key that is not the certificate's: keep the old certificate, say so once.
	if msg := err.Error(); msg != r.lastErr {
		r.lastErr = msg
		r.log.Error("TLS certificate reload failed: keeping the previous certificate",
			"tls_cert", r.certFile, "tls_key", r.keyFile, "error", err)
	}
	return err
}

func (r *Reloader) read() (certPEM, keyPEM []byte, err error) {
	if certPEM, err = os.ReadFile(r.certFile); err != nil {
		return nil, nil, err
	}
	if keyPEM, err = os.ReadFile(r.keyFile); err != nil {
		return nil, nil, err
	}
	return certPEM, keyPEM, nil
}

func parse(certPEM, keyPEM []byte) (*tls.Certificate, error) {
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, err
	}
	if cert.Leaf == nil { // Go 1.23+ fills it; older ones do not
		leaf, err := x509.ParseCertificate(cert.Certificate[0])
		if err != nil {
			return nil, err
		}
		cert.Leaf = leaf
	}
	return &cert, nil
}
