package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"

	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/fill"
	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/route"
)

// Scale-out (docs/scaleout.md): replicas share one store, and each digest has an owner
// among them by rendezvous hashing. A replica that misses a blob it does not own asks
// the owner for it over the peer path, a signed request with the client's own
// credential; the owner serves it as it serves any client (authorized by the origin with
// that credential, one origin fill, stored to the shared store) and never forwards it
// again. The asking replica streams the owner's answer through a fill of its own (its
// peer fills), so its concurrent clients share one peer stream, and a stream cut short
// (the owner died) is resumed from the next owner in rank, or from the origin when this
// replica is next. Peer fills store nothing unless their bytes came from the origin:
// the owner stores the blob, once.

// ClusterConfig makes a Server one replica of several on shared storage.
type ClusterConfig struct {
	// Membership lists the replicas (their member URLs, see cluster.ParseMember).
	Membership cluster.Membership
	// Self is this replica's member URL, as the others reach it.
	Self string
	// Secret proves peer requests (cluster.NewPeerAuth): the same on every replica.
	Secret []byte
	// DownFor is how long an owner that failed a request is skipped (default
	// cluster.DefaultDownFor).
	DownFor time.Duration
	// ConnectTimeout bounds a connection to an owner (default 2 s); HeaderTimeout, the
	// wait for its answer's headers (default 20 s: the owner answers once its origin
	// does, and cove-node waits 25 s for a healthy cache whose origin is slow, so a
	// frozen owner is routed around before the node gives up on this replica). Past
	// either, the owner is marked down and the next in rank asked.
	ConnectTimeout, HeaderTimeout time.Duration
	// Transport overrides the transport to peers (tests).
	Transport http.RoundTripper
	// Reservations decides the other replicas' reservations while this replica leads
	// shared eviction (peer_reserve.go); nil: they are answered 501.
	Reservations ReservationGranter
}

// peering is a replica's side of the peer path.
type peering struct {
	self    string
	ring    *cluster.Ring
	auth    *cluster.PeerAuth
	client  *http.Client
	fills   *fill.Manager
	metrics *peerMetrics
	uploads *http.Client // to replicas holding upload sessions (peer_upload.go)

	handover *handover          // notices and join-only offers (peer_handover.go)
	grants   ReservationGranter // the leader's side of reservations (peer_reserve.go)

	mu       sync.Mutex
	origined map[fill.Key]bool // peer fills whose bytes came from the origin: this replica stores them
}

func (s *Server) startPeering(cfg *ClusterConfig, spoolDir string, stall time.Duration) error {
	if cfg.Membership == nil {
		return fmt.Errorf("server: %w: cluster without membership", errdefs.ErrInvalidArgument)
	}
	self, err := cluster.ParseMember(cfg.Self)
	if err != nil {
		return fmt.Errorf("server: %w: cluster self: %w", errdefs.ErrInvalidArgument, err)
	}
	auth, err := cluster.NewPeerAuth(cfg.Secret)
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	var ringOpts []cluster.RingOption
	if cfg.DownFor > 0 {
		ringOpts = append(ringOpts, cluster.WithDownFor(cfg.DownFor))
	}
	transport := cfg.Transport
	if transport == nil {
		connect := orDefault(cfg.ConnectTimeout, 2*time.Second)
		transport = &http.Transport{
			Proxy:                 nil, // replicas talk directly, never through an egress proxy
			DialContext:           (&net.Dialer{Timeout: connect, KeepAlive: 30 * time.Second}).DialContext,
			ResponseHeaderTimeout: orDefault(cfg.HeaderTimeout, 20*time.Second),
			MaxIdleConnsPerHost:   64,
			IdleConnTimeout:       90 * time.Second,
			DisableCompression:    true, // blobs are compressed already; bytes must be the blob's
		}
	}
	p := &peering{
		self: self,
		ring: cluster.NewRing(cfg.Membership, self, ringOpts...),
		auth: auth,
		client: &http.Client{
			Transport: transport,
			// An owner never redirects a blob; following one would leave the peer path.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		origined: map[fill.Key]bool{},
		grants:   cfg.Reservations,
	}
	if p.metrics, err = newPeerMetrics(s.metrics.Registry, cfg.Membership.Members); err != nil {
		return err
	}
	if p.handover, err = newHandover(s.metrics.Registry, p.ring); err != nil {
		return err
	}
	p.fills, err = fill.NewManager(filepath.Join(spoolDir, "peer"), s.commitPeerFill,
		fill.WithStallTimeout(stall),
		fill.WithLogger(s.log),
		fill.WithEvents(fill.Events{Resume: p.metrics.resumed}),
		fill.WithDone(func(f *fill.Fill, _ error) { p.takeOrigined(f.Key) }),
	)
	if err != nil {
		return err
	}
	s.peers = p
	p.uploads = uploadPeerClient(transport)
	s.uploads.holder = cluster.MemberID(self) // handles name this replica (peer_upload.go)
	return nil
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

type peerRequestKey struct{}

// peerRefusedHeader marks a 403 that refused a request's peer authentication, not the
// origin's 403: the sender's secret differs (a misconfigured or rotating replica), and it
// goes to the next owner rather than relay a refusal its client did not earn.
const peerRefusedHeader = "Cove-Peer-Refused"

// acceptPeer checks a request that carries peer headers. A valid one goes on marked as
// a peer request (never forwarded again); any other is refused here: a request that
// claims to come from a replica and cannot prove it is an attack, not a client.
func (s *Server) acceptPeer(w http.ResponseWriter, r *http.Request) (*http.Request, bool) {
	w.Header().Set(peerRefusedHeader, "1") // on the refusals below: the sender routes around this replica
	if s.peers == nil {
		s.log.Warn("peer request refused: this cove-cache has no peers", "remote", r.RemoteAddr, "path", r.URL.Path)
		httpx.WriteError(w, http.StatusForbidden, "DENIED", "peer requests are not accepted here")
		return nil, false
	}
	peer, err := s.peers.auth.Verify(r)
	if err != nil {
		s.peers.metrics.requests.WithLabelValues("rejected").Inc()
		// The reason, never the signature or the secret.
		s.log.Warn("peer request refused", "remote", r.RemoteAddr, "path", r.URL.Path, "claimed_peer", r.Header.Get(cluster.HeaderPeer), "reason", err.Error())
		httpx.WriteError(w, http.StatusForbidden, "DENIED", "peer authentication failed")
		return nil, false
	}
	if r.URL.Path != noticePath && !isReservationPath(r.URL.Path) { // not blob requests: counted on their own
		s.peers.metrics.requests.WithLabelValues("accepted").Inc()
	}
	w.Header().Del(peerRefusedHeader)
	return r.WithContext(context.WithValue(r.Context(), peerRequestKey{}, peer)), true
}

// fromPeer reports whether r was forwarded by another replica (and verified).
func fromPeer(r *http.Request) bool {
	_, ok := r.Context().Value(peerRequestKey{}).(string)
	return ok
}

// forwardMiss serves a blob miss through its owner when the owner is another replica,
// and reports whether it did. A peer request is never forwarded: its sender chose this
// replica as the owner, and whatever this replica thinks of membership, it serves.
func (s *Server) forwardMiss(w http.ResponseWriter, r *http.Request, req *route.Request, path string) bool {
	p := s.peers
	if p == nil || fromPeer(r) || r.Method != http.MethodGet {
		return false
	}
	if route := p.ring.Route(req.Digest.String()); route.Owners[0] == p.self && route.Handoff == "" {
		return false
	}
	key := fill.Key{Registry: req.Registry, Digest: req.Digest}
	// The owner sees the canonical form (ns=, the origin's repository name) and the
	// credential as the origin takes it, whatever form this client used: the owner's
	// answers are the origin's own, which relay() adapts for this client (challenges).
	uri := path + "?ns=" + url.QueryEscape(req.Registry)
	originHeader := httpx.OriginRequestHeaders(r.Header)
	fetch := p.fetchFunc(s, key, uri, path, originHeader)
	s.serveFromFillVia(w, r, req, path, p.fills, fetch)
	return true
}

// joinPeerFill serves a miss this replica fills itself (it owns the blob, or the request
// came from a peer) from a peer fill of the blob in flight here, and reports whether it
// did. Such a fill exists when this replica was asking an owner that has since died, or
// while replicas disagree on the owner: joining it saves a second origin fetch. A fill
// started here (the peer fill ended meanwhile) goes to the origin, never to a peer.
func (s *Server) joinPeerFill(w http.ResponseWriter, r *http.Request, req *route.Request, path string) bool {
	p := s.peers
	if p == nil || r.Method != http.MethodGet {
		return false
	}
	key := fill.Key{Registry: req.Registry, Digest: req.Digest}
	f := p.fills.Lookup(key)
	if f == nil {
		return false
	}
	f.Release()
	originHeader := httpx.OriginRequestHeaders(r.Header)
	fetch := func(ctx context.Context, from, to int64) (*http.Response, error) {
		p.metrics.forwarded.WithLabelValues("origin").Inc()
		p.setOrigined(key)
		return s.origin.Do(ctx, http.MethodGet, key.Registry, path, nil, originHeader, fill.RangeHeader(from, to))
	}
	s.serveFromFillVia(w, r, req, path, p.fills, fetch)
	return true
}

// fetchFunc is a peer fill's FetchFunc: the owner's answer, or when the owners ranked
// above this replica are all down, the origin's. A call with from > 0 and no end resumes a
// stream cut short: its owner is marked down first, so the next in rank serves the rest.
// A bounded range (to >= 0: a range read ahead of the stream) is no sign of trouble.
func (p *peering) fetchFunc(s *Server, key fill.Key, uri, path string, originHeader http.Header) fill.FetchFunc {
	var last string // the owner that served the previous call
	return func(ctx context.Context, from, to int64) (*http.Response, error) {
		if from > 0 && to < 0 && last != "" {
			p.markDown(s, last, errors.New("stream cut short"))
		}
		route := p.ring.Route(key.Digest.String())
		if route.Handoff != "" { // a leaving replica may be filling it: offered first (peer_handover.go)
			if resp, ok := p.askHandoff(ctx, s, route.Handoff, uri, originHeader, from, to); ok {
				p.metrics.forwarded.WithLabelValues("owner").Inc()
				last = route.Handoff
				return resp, nil
			}
			if ctx.Err() != nil {
				return nil, context.Cause(ctx)
			}
		}
		for _, owner := range route.Owners {
			if owner == p.self {
				if resp, ok := s.storedRange(ctx, key, from, to); ok {
					last = "" // the owner it streamed from stored it before it went
					return resp, nil
				}
				p.metrics.forwarded.WithLabelValues("origin").Inc()
				p.setOrigined(key)
				last = ""
				return s.origin.Do(ctx, http.MethodGet, key.Registry, path, nil, originHeader, fill.RangeHeader(from, to))
			}
			resp, err := p.get(ctx, owner, uri, originHeader, from, to)
			if err == nil && resp.StatusCode == http.StatusForbidden && resp.Header.Get(peerRefusedHeader) != "" {
				resp.Body.Close()
				s.log.Error("owner replica refused this replica's peer authentication: do the replicas hold the same --peer-secret-file?", "owner", owner)
				p.markDown(s, owner, errors.New("peer authentication refused"))
				continue
			}
			if err == nil && leavingAnswer(resp) { // past its grace (peer_handover.go)
				p.markDown(s, owner, errors.New("leaving"))
				continue
			}
			if err == nil {
				p.metrics.forwarded.WithLabelValues("owner").Inc()
				last = owner
				return resp, nil
			}
			if ctx.Err() != nil {
				return nil, err
			}
			p.markDown(s, owner, err)
		}
		return nil, errors.New("no owner") // unreachable: Owners ends at self
	}
}

// get asks owner for uri on the peer path, with the client's origin credential.
func (p *peering) get(ctx context.Context, owner, uri string, originHeader http.Header, from, to int64) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, owner+uri, nil)
	if err != nil {
		return nil, err
	}
	if v := originHeader.Values("Authorization"); len(v) > 0 {
		req.Header["Authorization"] = v
	}
	for k, v := range fill.RangeHeader(from, to) {
		req.Header[k] = v
	}
	req.Header.Set("Accept-Encoding", "identity")
	req.Header.Set("User-Agent", "cove-cache-peer")
	p.auth.Sign(req, p.self)
	return p.client.Do(req)
}

func (p *peering) markDown(s *Server, owner string, err error) {
	if p.ring.MarkDown(owner) {
		p.metrics.ownerDown.Inc()
		s.log.Warn("owner replica unreachable: routing around it", "owner", owner, "error", err)
	}
}

func (p *peering) setOrigined(key fill.Key) {
	p.mu.Lock()
	p.origined[key] = true
	p.mu.Unlock()
}

func (p *peering) takeOrigined(key fill.Key) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	was := p.origined[key]
	delete(p.origined, key)
	return was
}

// commitPeerFill stores a verified peer fill only when this replica fetched (part of)
// it from the origin itself: the owner stores what it served, and the shared store
// gets each blob once.
func (s *Server) commitPeerFill(ctx context.Context, f *fill.Fill, spoolPath string) error {
	if !s.peers.takeOrigined(f.Key) {
		return nil
	}
	file, err := os.Open(spoolPath)
	if err != nil {
		return err
	}
	defer file.Close()
	if err := s.store.Put(ctx, f.Key.Digest, f.Size(), file); err != nil {
		return err
	}
	return s.recordProvenance(ctx, f.Key.Registry, f.Key.Digest)
}
