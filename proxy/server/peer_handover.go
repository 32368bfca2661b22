package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/fill"
	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/route"
)

// Handing fills over when a replica drains (docs/scaleout.md, "A replica that drains").
//
// On SIGTERM the draining replica tells every other member at once, with a signed
// notice on the peer path, that it is leaving and until when at most (its drain's
// bound). From then on the others start no new fill on it: the next member in rank
// owns the blobs it owned. The fills it runs are not wasted: a miss whose first member
// in rank (not down) is a leaving replica is first offered to it join-only, a peer GET
// marked with the cove-join-only query parameter (covered by the signature), which it
// answers from its fill in flight or its store, and otherwise with a 404 marked
// Cove-Peer-Join-Miss, never by starting a fetch. Only then does the next owner fill:
// one origin fetch survives the handover. The draining replica itself forwards the
// misses it owned to the next member, so the fills it would have started run on a
// replica that stays. A replica that starts says it serves, which ends its old process's
// leaving at once.

const (
	// noticePath receives a replica's notices about itself (POST, peer-signed).
	noticePath = "/cove/peer/notice"
	// joinOnlyParam marks a peer blob GET that must not start a fill.
	joinOnlyParam = "cove-join-only"
	// joinMissHeader marks the answer to a join-only request that found nothing to join.
	joinMissHeader = "Cove-Peer-Join-Miss"
	// leavingHeader marks a draining replica's refusal once its grace is over: the
	// asking replica routes around it as around a dead one.
	leavingHeader = "Cove-Peer-Leaving"
	// noticeTimeout bounds the sending of one notice: a peer that cannot take it within
	// this (it is down, or frozen) learns of the drain from its own failed requests.
	noticeTimeout = 5 * time.Second
)

// Notice states.
const (
	noticeLeaving = "leaving"
	noticeServing = "serving"
)

// handover is a replica's side of notices and join-only offers.
type handover struct {
	asked   *prometheus.CounterVec // join-only offers this replica made, by result
	served  *prometheus.CounterVec // join-only requests this replica answered, by result
	notices *prometheus.CounterVec // notices received, by state and result

	// closing is set when a draining replica's grace is over: it serves the replicas
	// joining its fills still in flight, and refuses everything else (CloseToClients).
	closing atomic.Bool

	mu   sync.Mutex
	last map[string]noticeStamp // sender -> its latest notice applied
}

type noticeStamp struct {
	at    int64 // the signed time, Unix seconds
	state string
}

func newHandover(reg prometheus.Registerer, ring *cluster.Ring) (*handover, error) {
	h := &handover{
		asked: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_peer_handover_total",
			Help: "Misses first offered join-only to a leaving replica, by result: joined (it streamed its fill or stored copy), missed (it had none: the next owner filled), failed (unreachable or refused).",
		}, []string{"result"}),
		served: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_peer_handover_served_total",
			Help: "Join-only requests this replica answered while others took over from it, by result: joined (served from its fill in flight), missed (nothing in flight).",
		}, []string{"result"}),
		notices: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_peer_notices_total",
			Help: "Peer notices received (a replica leaving, or serving again), by state and result: applied, stale (older than one applied already), invalid.",
		}, []string{"state", "result"}),
		last: map[string]noticeStamp{},
	}
	leaving := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cove_peer_leaving",
		Help: "Replicas this replica takes as leaving (draining) now, itself included: they own no new fill.",
	}, func() float64 { return float64(len(ring.Leaving())) })
	for _, c := range []prometheus.Collector{h.asked, h.served, h.notices, leaving} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	for _, r := range []string{"joined", "missed", "failed"} {
		h.asked.WithLabelValues(r)
	}
	return h, nil
}

// AnnounceLeaving tells every other member, in parallel, that this replica drains and
// will be gone within bound, and returns how many took the notice. Call it after Drain.
// Each notice is bounded by noticeTimeout; the ones that fail are logged and not retried.
func (s *Server) AnnounceLeaving(ctx context.Context, bound time.Duration) int {
	return s.announce(ctx, noticeLeaving, time.Now().Add(bound))
}

// AnnounceServing tells every other member that this replica serves: a replica started
// again at the URL of one that drained is an owner again at once, not once its
// predecessor's announced bound has passed.
func (s *Server) AnnounceServing(ctx context.Context) int {
	return s.announce(ctx, noticeServing, time.Time{})
}

func (s *Server) announce(ctx context.Context, state string, until time.Time) int {
	p := s.peers
	if p == nil {
		return 0
	}
	q := url.Values{"state": {state}}
	if !until.IsZero() {
		q.Set("until", strconv.FormatInt(until.Unix(), 10))
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	told, others := 0, 0
	for _, m := range p.ring.Members() {
		if m == p.self {
			continue
		}
		others++
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := p.sendNotice(ctx, m, q.Encode())
			if err != nil {
				level := slog.LevelWarn
				if state == noticeServing {
					level = slog.LevelDebug // at a cluster's start, the others are starting too
				}
				s.log.Log(ctx, level, "peer notice not taken", "state", state, "peer", m, "error", err)
				return
			}
			mu.Lock()
			told++
			mu.Unlock()
		}()
	}
	wg.Wait()
	s.log.Info("told the other replicas", "state", state, "told", told, "others", others)
	return told
}

func (p *peering) sendNotice(ctx context.Context, member, query string) error {
	ctx, cancel := context.WithTimeout(ctx, noticeTimeout)
	defer cancel()
	return p.post(ctx, member, noticePath, query)
}

// serveNotice applies a verified replica's notice about itself. The sender is the
// signed Cove-Peer: a replica can only announce itself. Notices apply in the order of
// their signed times, and a leaving notice's end is the signed until, so a replayed
// notice changes nothing.
func (s *Server) serveNotice(w http.ResponseWriter, r *http.Request) {
	sender, ok := r.Context().Value(peerRequestKey{}).(string)
	if !ok || s.peers == nil {
		w.Header().Set(peerRefusedHeader, "1")
		s.log.Warn("peer notice refused: not a verified peer request", "remote", r.RemoteAddr)
		httpx.WriteError(w, http.StatusForbidden, "DENIED", "peer notices come from replicas only")
		return
	}
	p := s.peers
	q := r.URL.Query()
	state := q.Get("state")
	at, _ := strconv.ParseInt(r.Header.Get(cluster.HeaderTime), 10, 64) // verified: it parses
	var until time.Time
	switch state {
	case noticeServing:
	case noticeLeaving:
		sec, err := strconv.ParseInt(q.Get("until"), 10, 64)
		if err != nil || sec <= 0 {
			p.handover.notices.WithLabelValues(state, "invalid").Inc()
			httpx.WriteError(w, http.StatusBadRequest, "UNSUPPORTED", "leaving notice without a valid until")
			return
		}
		until = time.Unix(sec, 0)
	default:
		p.handover.notices.WithLabelValues("unknown", "invalid").Inc()
		httpx.WriteError(w, http.StatusBadRequest, "UNSUPPORTED", "unknown notice state")
		return
	}
	if !p.handover.newer(sender, noticeStamp{at: at, state: state}) {
		p.handover.notices.WithLabelValues(state, "stale").Inc()
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if state == noticeLeaving {
		p.ring.MarkLeaving(sender, until)
		s.log.Info("replica leaving: it owns no new fill, its fills are joined", "peer", sender, "until", until.UTC())
	} else {
		p.ring.MarkServing(sender)
		s.log.Info("replica serving", "peer", sender)
	}
	p.handover.notices.WithLabelValues(state, "applied").Inc()
	w.WriteHeader(http.StatusNoContent)
}

// newer records st as sender's latest notice unless one signed later was applied (the
// same notice again is applied again: it changes nothing).
func (h *handover) newer(sender string, st noticeStamp) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if prev, ok := h.last[sender]; ok && (st.at < prev.at || st.at == prev.at && st.state != prev.state) {
		return false
	}
	h.last[sender] = st
	return true
}

// isJoinOnly reports whether r asks join-only (whoever sent it).
func isJoinOnly(r *http.Request) bool { return r.URL.Query().Has(joinOnlyParam) }

// refuseUnverifiedJoinOnly answers 403 to a join-only request that is not a verified
// peer request, and reports whether it did: only replicas hand fills over.
func (s *Server) refuseUnverifiedJoinOnly(w http.ResponseWriter, r *http.Request) bool {
	if !isJoinOnly(r) || fromPeer(r) {
		return false
	}
	w.Header().Set(peerRefusedHeader, "1")
	s.log.Warn("join-only request refused: not a verified peer request", "remote", r.RemoteAddr, "path", r.URL.Path)
	httpx.WriteError(w, http.StatusForbidden, "DENIED", "join-only requests come from replicas only")
	return true
}

// serveJoinOnly answers a verified join-only request for a blob not stored here: from
// the origin fill in flight here, or with a join miss. It never starts a fill, and
// reports whether r was join-only.
func (s *Server) serveJoinOnly(w http.ResponseWriter, r *http.Request, req *route.Request, path string) bool {
	if !isJoinOnly(r) || !fromPeer(r) {
		return false
	}
	if s.serveRunningFill(w, r, req, path) {
		s.peers.handover.served.WithLabelValues("joined").Inc()
		return true
	}
	s.peers.handover.served.WithLabelValues("missed").Inc()
	w.Header().Set(joinMissHeader, "1")
	httpx.WriteError(w, http.StatusNotFound, "BLOB_UNKNOWN", "this replica is not filling the blob: ask the next owner")
	return true
}

// joinOwnFill serves a client's miss from the origin fill of the blob in flight here,
// whatever the ring says now, and reports whether it did: this replica owned the blob
// when the fill started (it drains now, or the membership moved), and a second fetch
// elsewhere would be waste.
func (s *Server) joinOwnFill(w http.ResponseWriter, r *http.Request, req *route.Request, path string) bool {
	if s.peers == nil || fromPeer(r) || r.Method != http.MethodGet {
		return false
	}
	return s.serveRunningFill(w, r, req, path)
}

// serveRunningFill serves r from the origin fill of its blob in flight here, if there
// is one (never starting one), and reports whether it did.
func (s *Server) serveRunningFill(w http.ResponseWriter, r *http.Request, req *route.Request, path string) bool {
	key := fill.Key{Registry: req.Registry, Digest: req.Digest}
	f := s.fills.JoinRunning(key, fillOwner(r, req), rangeStart(r.Header.Get("Range")), s.originFetch(r, req, path))
	return f != nil && s.serveJoined(w, r, req, path, f, false)
}

// originFetch is a fill's FetchFunc with this client's credential.
func (s *Server) originFetch(r *http.Request, req *route.Request, path string) fill.FetchFunc {
	originHeader := httpx.OriginRequestHeaders(r.Header) // the fill may outlive this request
	registry := req.Registry
	return func(ctx context.Context, from, to int64) (*http.Response, error) {
		return s.origin.Do(ctx, http.MethodGet, registry, path, nil, originHeader, fill.RangeHeader(from, to))
	}
}

// askHandoff offers a miss join-only to the leaving member. ok: resp is its answer (its
// fill's stream, its stored copy, or the origin's refusal of this credential), for the
// peer fill to read as an owner's. Otherwise the next owner is to be asked.
func (p *peering) askHandoff(ctx context.Context, s *Server, member, uri string, originHeader http.Header, from, to int64) (*http.Response, bool) {
	resp, err := p.get(ctx, member, uri+"&"+joinOnlyParam+"=1", originHeader, from, to)
	switch {
	case err != nil:
		if ctx.Err() == nil {
			p.markDown(s, member, err)
		}
		p.handover.asked.WithLabelValues("failed").Inc()
		return nil, false
	case resp.StatusCode == http.StatusForbidden && resp.Header.Get(peerRefusedHeader) != "":
		resp.Body.Close()
		s.log.Error("leaving replica refused this replica's peer authentication: do the replicas hold the same --peer-secret-file?", "peer", member)
		p.markDown(s, member, errors.New("peer authentication refused"))
		p.handover.asked.WithLabelValues("failed").Inc()
		return nil, false
	case leavingAnswer(resp):
		p.markDown(s, member, errors.New("leaving"))
		p.handover.asked.WithLabelValues("failed").Inc()
		return nil, false
	case resp.Header.Get(joinMissHeader) != "":
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
		resp.Body.Close()
		p.handover.asked.WithLabelValues("missed").Inc()
		return nil, false
	}
	p.handover.asked.WithLabelValues("joined").Inc()
	return resp, true
}

// storedRange answers a peer fill's fetch from the shared store when the blob is there:
// the owner it was streaming from stored it before it went, and the rest is read from
// the store instead of fetched again.
func (s *Server) storedRange(ctx context.Context, key fill.Key, from, to int64) (*http.Response, bool) {
	size, ok := s.hasBlob(ctx, key.Registry, key.Digest)
	if !ok || from >= size {
		return nil, false
	}
	blob, err := s.store.Open(ctx, key.Digest)
	if err != nil {
		return nil, false
	}
	end := size - 1
	if to >= 0 && to < end {
		end = to
	}
	n := end - from + 1
	resp := &http.Response{
		StatusCode:    http.StatusOK,
		Header:        http.Header{"Content-Length": {strconv.FormatInt(n, 10)}},
		ContentLength: n,
		Body: struct {
			io.Reader
			io.Closer
		}{io.NewSectionReader(blob, from, n), blob},
	}
	if from > 0 || to >= 0 {
		resp.StatusCode = http.StatusPartialContent
		resp.Header.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", from, end, size))
	}
	resp.Status = strconv.Itoa(resp.StatusCode) + " " + http.StatusText(resp.StatusCode)
	return resp, true
}

// CloseToClients ends a draining replica's grace without closing its listener yet: the
// fills still running here stay joinable by the replicas taking over (join-only
// requests), while every other request is refused with 503 (marked Cove-Peer-Leaving,
// so a replica routes around it at once; a client falls back as from a refused
// connection). It reports whether it applies: false for a single replica, which closes
// its listener instead. Call it after Drain, then close the listener once
// Fills().InFlight() is 0 or the drain's bound has passed.
func (s *Server) CloseToClients() bool {
	if s.peers == nil || !s.Draining() {
		return false
	}
	s.peers.handover.closing.Store(true)
	return true
}

// refuseWhileClosing answers 503 to what a closing replica no longer serves (see
// CloseToClients), and reports whether it did.
func (s *Server) refuseWhileClosing(w http.ResponseWriter, r *http.Request) bool {
	if s.peers == nil || !s.peers.handover.closing.Load() {
		return false
	}
	if fromPeer(r) && isJoinOnly(r) {
		return false
	}
	switch r.URL.Path {
	case "/readyz", "/healthz", "/metrics":
		return false
	}
	w.Header().Set(leavingHeader, "1")
	w.Header().Set("Connection", "close")
	httpx.WriteError(w, http.StatusServiceUnavailable, "UNAVAILABLE", "this replica is leaving: ask another")
	return true
}

// leavingAnswer reports whether resp is a closing replica's refusal (see
// refuseWhileClosing), and closes it when it is.
func leavingAnswer(resp *http.Response) bool {
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get(leavingHeader) == "" {
		return false
	}
	resp.Body.Close()
	return true
}
