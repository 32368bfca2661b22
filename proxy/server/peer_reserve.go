package server

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errhttp"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/httpx"
)

// Reservations on the peer path (docs/scaleout.md, "Reservations"): a follower asks the
// eviction leader for room before a fill spools, so the bound holds exactly however
// many replicas start fills at once. The request is a signed POST; its sender is the
// verified Cove-Peer, so a replica can only reserve and release in its own name. The
// answer is a status, mapped from the errdefs class in one place (httpx.WriteErr):
// 204 granted or released, 429 refused for want of room, 412 this replica is not the
// leader (or the grant ended), 501 no shared bound here, 400 bad arguments, 403 not a
// verified member.

const (
	reservePath = "/cove/peer/reserve"
	releasePath = "/cove/peer/release"
)

// ReservationGranter is the eviction leader's side of shared reservations
// (evict.Store implements it).
type ReservationGranter interface {
	GrantReservation(member string, seq uint64, d digest.Digest, cost int64) error
	ReturnReservation(ctx context.Context, member string, seq uint64, d digest.Digest, stored bool, size int64) error
}

func isReservationPath(p string) bool { return p == reservePath || p == releasePath }

// reservationRequest reads what a reservation or a release names: the verified member
// that sent it, its seq and digest. Otherwise it answers (403 not another member's own
// request, 501 no shared bound here, 400 bad arguments) and returns ok false.
func (s *Server) reservationRequest(w http.ResponseWriter, r *http.Request) (sender string, seq uint64, d digest.Digest, ok bool) {
	sender, verified := r.Context().Value(peerRequestKey{}).(string)
	switch {
	case !verified || s.peers == nil:
		s.log.Warn("peer reservation refused: not a verified peer request", "remote", r.RemoteAddr, "path", r.URL.Path)
	case sender == s.peers.self || !slices.Contains(s.peers.ring.Members(), sender):
		s.log.Warn("peer reservation refused: the sender is not another member", "remote", r.RemoteAddr, "peer", sender)
	case s.peers.grants == nil:
		httpx.WriteErr(w, fmt.Errorf("%w: this replica keeps no shared bound", errdefs.ErrNotImplemented))
		return "", 0, "", false
	default:
		q := r.URL.Query()
		var err error
		if seq, err = strconv.ParseUint(q.Get("seq"), 10, 64); err != nil || seq == 0 {
			httpx.WriteErr(w, httpx.InvalidArgument("seq: want a positive integer"))
			return "", 0, "", false
		}
		if d, err = digest.Parse(q.Get("digest")); err != nil {
			httpx.WriteErr(w, httpx.InvalidArgument("digest: "+err.Error()))
			return "", 0, "", false
		}
		return sender, seq, d, true
	}
	w.Header().Set(peerRefusedHeader, "1")
	httpx.WriteErr(w, httpx.PermissionDenied("reservations come from the other replicas only"))
	return "", 0, "", false
}

// serveReserve answers a follower's reservation: seq (its number for it), digest, cost.
func (s *Server) serveReserve(w http.ResponseWriter, r *http.Request) {
	sender, seq, d, ok := s.reservationRequest(w, r)
	if !ok {
		return
	}
	cost, err := strconv.ParseInt(r.URL.Query().Get("cost"), 10, 64)
	if err != nil || cost <= 0 {
		err = httpx.InvalidArgument("cost: want a positive byte count")
	} else {
		err = s.peers.grants.GrantReservation(sender, seq, d, cost)
	}
	if err != nil {
		httpx.WriteErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// serveRelease answers a follower's end of a grant: seq, digest, and stored=1 with the
// blob's size when the blob is in the store now.
func (s *Server) serveRelease(w http.ResponseWriter, r *http.Request) {
	sender, seq, d, ok := s.reservationRequest(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	stored := q.Get("stored") == "1"
	var size int64 = -1
	var err error
	if stored {
		if size, err = strconv.ParseInt(q.Get("size"), 10, 64); err != nil || size < 0 {
			err = httpx.InvalidArgument("size: want the stored blob's byte count")
		}
	}
	if err == nil {
		err = s.peers.grants.ReturnReservation(r.Context(), sender, seq, d, stored, size)
	}
	if err != nil {
		httpx.WriteErr(w, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// ReservationLink is a follower's way to the leader's grants (evict.LeaderLink), or nil
// for a cove-cache without peers.
func (s *Server) ReservationLink() *ReservationLink {
	if s.peers == nil {
		return nil
	}
	return &ReservationLink{p: s.peers}
}

// ReservationLink asks the eviction leader over the peer path.
type ReservationLink struct{ p *peering }

// Reserve asks leader for cost bytes for d, numbered seq by this replica.
func (l *ReservationLink) Reserve(ctx context.Context, leader string, seq uint64, d digest.Digest, cost int64) error {
	q := url.Values{"seq": {strconv.FormatUint(seq, 10)}, "digest": {d.String()}, "cost": {strconv.FormatInt(cost, 10)}}
	return l.p.post(ctx, leader, reservePath, q.Encode())
}

// Release gives grant seq back to leader; stored: d is in the store now, size bytes.
func (l *ReservationLink) Release(ctx context.Context, leader string, seq uint64, d digest.Digest, stored bool, size int64) error {
	q := url.Values{"seq": {strconv.FormatUint(seq, 10)}, "digest": {d.String()}}
	if stored {
		q.Set("stored", "1")
		q.Set("size", strconv.FormatInt(size, 10))
	}
	return l.p.post(ctx, leader, releasePath, q.Encode())
}

// post sends a signed POST without a body to member and wants 204. An error carries the
// errdefs class of the status member answered (errhttp, the inverse of httpx.WriteErr)
// and the start of its message.
func (p *peering) post(ctx context.Context, member, path, query string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, member+path+"?"+query, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "cove-cache-peer")
	p.auth.Sign(req, p.self)
	resp, err := p.client.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %w", errdefs.ErrUnavailable, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	if resp.StatusCode == http.StatusNoContent {
		return nil
	}
	return fmt.Errorf("%w: %s answered %d: %s", errhttp.ToNative(resp.StatusCode), member, resp.StatusCode, strings.TrimSpace(string(body)))
}
