package cluster

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/errdefs"
)

// Peer requests are proven by a secret every replica reads from a file (in Kubernetes,
// a mounted Secret): the sending replica signs each request with HMAC-SHA256 over what
// identifies it (method, request URI, Range, a hash of the Authorization it carries),
// the time, and the sender's member URL. A signature is good for a short window either
// side of the receiver's clock, so one captured on the network stops working within
// seconds, and it cannot be moved onto another request or another credential.
//
// A valid signature grants nothing but "this comes from a replica: serve it, do not
// forward it again". The request is still a client's: the receiver authorizes it with
// the client's credential it carries, as for any client.

// The headers of a peer request.
const (
	HeaderPeer      = "Cove-Peer"           // the sending replica's member URL
	HeaderTime      = "Cove-Peer-Time"      // Unix seconds when it was signed
	HeaderSignature = "Cove-Peer-Signature" // base64url HMAC-SHA256, unpadded
)

// DefaultWindow is how far a peer request's time may be from the receiver's clock.
const DefaultWindow = 30 * time.Second

// MinSecretBytes is the shortest secret accepted: 128 bits.
const MinSecretBytes = 16

// PeerAuth signs and verifies peer requests with one shared secret.
type PeerAuth struct {
	secret []byte
	window time.Duration
	now    func() time.Time
}

// PeerAuthOption configures a PeerAuth.
type PeerAuthOption func(*PeerAuth)

// WithWindow sets how far a request's time may be from now (default DefaultWindow).
func WithWindow(d time.Duration) PeerAuthOption { return func(a *PeerAuth) { a.window = d } }

// WithNow replaces the clock (tests).
func WithNow(now func() time.Time) PeerAuthOption { return func(a *PeerAuth) { a.now = now } }

// NewPeerAuth returns a PeerAuth for secret (at least MinSecretBytes).
func NewPeerAuth(secret []byte, opts ...PeerAuthOption) (*PeerAuth, error) {
	if len(secret) < MinSecretBytes {
		return nil, fmt.Errorf("%w: peer secret is %d bytes, want at least %d", errdefs.ErrInvalidArgument, len(secret), MinSecretBytes)
	}
	a := &PeerAuth{secret: bytes.Clone(secret), window: DefaultWindow, now: time.Now}
	for _, o := range opts {
		o(a)
	}
	return a, nil
}

// ReadSecretFile reads a peer secret from path; surrounding white space (the newline an
// editor or echo leaves) is not part of it. The error never contains the file's bytes.
func ReadSecretFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("peer secret: %w", err)
	}
	b = bytes.TrimSpace(b)
	if len(b) < MinSecretBytes {
		return nil, fmt.Errorf("%w: peer secret file %s holds %d bytes, want at least %d", errdefs.ErrInvalidArgument, path, len(b), MinSecretBytes)
	}
	return b, nil
}

// Sign adds the peer headers to req, sent by the member self.
func (a *PeerAuth) Sign(req *http.Request, self string) {
	ts := strconv.FormatInt(a.now().Unix(), 10)
	req.Header.Set(HeaderPeer, self)
	req.Header.Set(HeaderTime, ts)
	req.Header.Set(HeaderSignature, a.mac(req.Method, req.URL.RequestURI(), req.Header, ts, self))
}

// Errors of Verify. Both are errdefs.ErrPermissionDenied.
var (
	ErrNotPeer     = fmt.Errorf("%w: not a peer request", errdefs.ErrPermissionDenied)
	ErrBadPeerAuth = fmt.Errorf("%w: peer authentication failed", errdefs.ErrPermissionDenied)
)

// IsPeerRequest reports whether r carries any peer header: such a request is a peer
// request or an attack, never a plain client request.
func IsPeerRequest(r *http.Request) bool {
	return r.Header.Get(HeaderPeer) != "" || r.Header.Get(HeaderTime) != "" || r.Header.Get(HeaderSignature) != ""
}

// Verify checks r's peer headers and returns the sender's member URL. The error says
// why verification failed (for logs and metrics: it never holds the signature); it is
// ErrNotPeer when r has no peer header, else wraps ErrBadPeerAuth.
func (a *PeerAuth) Verify(r *http.Request) (string, error) {
	if !IsPeerRequest(r) {
		return "", ErrNotPeer
	}
	peer, ts, sig := r.Header.Get(HeaderPeer), r.Header.Get(HeaderTime), r.Header.Get(HeaderSignature)
	if peer == "" || ts == "" || sig == "" {
		return "", fmt.Errorf("%w: incomplete peer headers", ErrBadPeerAuth)
	}
	if _, err := ParseMember(peer); err != nil {
		return "", fmt.Errorf("%w: sender is not a member URL", ErrBadPeerAuth)
	}
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return "", fmt.Errorf("%w: malformed time", ErrBadPeerAuth)
	}
	if skew := a.now().Sub(time.Unix(sec, 0)); skew > a.window || skew < -a.window {
		return "", fmt.Errorf("%w: signed %s from now, outside the %s window", ErrBadPeerAuth, skew.Round(time.Second), a.window)
	}
	want := a.mac(r.Method, r.URL.RequestURI(), r.Header, ts, peer)
	if !hmac.Equal([]byte(sig), []byte(want)) {
		return "", fmt.Errorf("%w: wrong signature", ErrBadPeerAuth)
	}
	return peer, nil
}

// mac is the signature of one request. Each field is length-prefixed, so no two
// different requests sign the same bytes.
func (a *PeerAuth) mac(method, uri string, h http.Header, ts, peer string) string {
	cred := sha256.Sum256([]byte(strings.Join(h.Values("Authorization"), "\n")))
	m := hmac.New(sha256.New, a.secret)
	for _, field := range []string{"cove-peer-v1", method, uri, h.Get("Range"), string(cred[:]), ts, peer} {
		_, _ = m.Write([]byte(strconv.Itoa(len(field)) + ":"))
		_, _ = m.Write([]byte(field))
	}
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// IsBadPeerAuth reports whether err is a failed verification (not a missing one).
func IsBadPeerAuth(err error) bool { return errors.Is(err, ErrBadPeerAuth) }
