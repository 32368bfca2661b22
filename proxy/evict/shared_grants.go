package evict

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/fill"
)

// Reservations granted by the leader (docs/scaleout.md, "Reservations").
//
// The records are read and written every SyncInterval, so two fills starting at once on
// two replicas could both count the same free room from them. A follower asks the
// eviction leader instead, over the peer path (LeaderLink): the leader decides every
// grant under its one mutex, against what it stores, what it granted, and what the
// records say the replicas reserved otherwise, so grants never pass the bound. A grant
// is a lease renewed by the holder's records: each record lists the grants its writer
// still holds, and the leader drops one that a record taken after it was asked for no
// longer lists, or whose holder stopped or went stale. When the leader cannot answer in
// time (it changed, it is down, it is not reachable), the follower reserves on the
// records' estimate as before (counted as a fallback).

// LeaderLink carries a follower's reservations to the eviction leader (the peer path:
// server.ReservationLink). Errors are errdefs classes: ResourceExhausted is the leader's
// refusal; anything else means the leader did not decide.
type LeaderLink interface {
	Reserve(ctx context.Context, leader string, seq uint64, d digest.Digest, cost int64) error
	Release(ctx context.Context, leader string, seq uint64, d digest.Digest, stored bool, size int64) error
}

// grantTimeout bounds a call to the leader: past it, the follower reserves on its own
// estimate rather than hold the fill up.
const grantTimeout = 3 * time.Second

// linkBackoff is how long a follower reserves on its own estimate after the leader
// did not decide: a leader that hangs costs one grantTimeout per backoff, not per fill,
// until the next round names another.
const linkBackoff = 10 * time.Second

// endedKept is the least time an ended grant is remembered, so that a replay of its
// signed request is refused: well past a peer signature's window (cluster.DefaultWindow).
const endedKept = 2 * time.Minute

// The leader's answers that are the same for a reservation and its release.
var (
	errNoSharedBound = fmt.Errorf("%w: this replica keeps no shared bound", errdefs.ErrNotImplemented)
	errNotLeader     = fmt.Errorf("%w: this replica is not the eviction leader", errdefs.ErrFailedPrecondition)
)

// Results of shared reservations (the metric's label).
const (
	grantGranted  = "granted"
	grantRefused  = "refused"
	grantExpired  = "expired"
	grantFallback = "fallback"
)

type grantKey struct {
	member string
	seq    uint64
}

type grant struct {
	d    digest.Digest
	cost int64
	at   time.Time
}

// grantBook is the leader's account of its grants; guarded by Store.mu.
type grantBook struct {
	granted     map[grantKey]*grant
	grantedCost int64
	ended       map[grantKey]time.Time // released or expired: a replay is refused
	listed      map[string][]seenGrant // live member -> the grants its last record lists
}

func newGrantBook() grantBook {
	return grantBook{granted: map[grantKey]*grant{}, ended: map[grantKey]time.Time{}, listed: map[string][]seenGrant{}}
}

// SetLeaderLink lets a follower ask the leader for its reservations. Call it before
// serving; without a link, reservations are made on the records' estimate.
func (s *Store) SetLeaderLink(l LeaderLink) {
	s.mu.Lock()
	s.link = l
	s.mu.Unlock()
}

// Leader returns the eviction leader's member URL as of the last round ("" before one).
func (s *Store) Leader() string {
	if s.sh == nil {
		return ""
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sh.leader {
		return s.sh.cfg.Self
	}
	return s.sh.usage.Leader
}

// GrantReservation is the leader's decision on a follower's reservation of cost bytes
// for d, named by the follower's seq. It is idempotent for a grant held. Errors:
// NotImplemented (no shared bound here), FailedPrecondition (not the leader, or the
// grant ended), InvalidArgument, ResourceExhausted (no room: the fill passes through).
func (s *Store) GrantReservation(member string, seq uint64, d digest.Digest, cost int64) error {
	if s.sh == nil || s.cfg.MaxSize == 0 {
		return errNoSharedBound
	}
	if member == "" || seq == 0 || d.Validate() != nil || cost <= 0 {
		return fmt.Errorf("%w: a reservation names its replica, a seq, a digest and a positive cost", errdefs.ErrInvalidArgument)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sh := s.sh
	if !sh.leader {
		return errNotLeader
	}
	k := grantKey{member, seq}
	if g := sh.granted[k]; g != nil {
		if g.d != d || g.cost != cost {
			return fmt.Errorf("%w: reservation %d is held for another blob or size", errdefs.ErrInvalidArgument, seq)
		}
		return nil
	}
	if _, ended := sh.ended[k]; ended {
		return fmt.Errorf("%w: reservation %d ended", errdefs.ErrFailedPrecondition, seq)
	}
	if over := s.usedLocked() + cost - s.cfg.MaxSize; over > 0 {
		s.wantRoomLocked(over)
		s.m.SharedReservations.WithLabelValues(grantRefused).Inc()
		s.kickEvict()
		return fmt.Errorf("%w: no room for blob %s (%d bytes) until the eviction leader frees some", errdefs.ErrResourceExhausted, d, cost)
	}
	sh.granted[k] = &grant{d: d, cost: cost, at: s.now()}
	sh.grantedCost += cost
	s.m.SharedReservations.WithLabelValues(grantGranted).Inc()
	s.gaugesLocked()
	s.kickEvict() // past the high watermark: make room ahead of the next fill
	return nil
}

// ReturnReservation ends a grant: the holder's fill ended, and stored says whether its
// blob (size bytes) is in the bucket now, which the leader counts at once rather than at
// its next merge. Returning a grant already ended is not an error (a retry).
func (s *Store) ReturnReservation(ctx context.Context, member string, seq uint64, d digest.Digest, stored bool, size int64) error {
	if s.sh == nil || s.cfg.MaxSize == 0 {
		return errNoSharedBound
	}
	if member == "" || seq == 0 || d.Validate() != nil || (stored && size < 0) {
		return fmt.Errorf("%w: a release names its replica, a seq, a digest and a stored blob's size", errdefs.ErrInvalidArgument)
	}
	sh := s.sh
	k := grantKey{member, seq}
	s.mu.Lock()
	g := sh.granted[k]
	_, ended := sh.ended[k]
	switch {
	case g != nil && g.d != d:
		s.mu.Unlock()
		return fmt.Errorf("%w: reservation %d is held for another blob", errdefs.ErrInvalidArgument, seq)
	case g == nil && ended:
		s.mu.Unlock()
		return nil // a retry
	case g == nil:
		leader := sh.leader
		s.mu.Unlock()
		if !leader {
			return errNotLeader
		}
		return fmt.Errorf("%w: no reservation %d of this replica is held here", errdefs.ErrFailedPrecondition, seq)
	}
	s.mu.Unlock()
	if stored {
		// Counted before the grant's room is given back: never both free at once.
		s.mergeBlob(ctx, seenBlob{Digest: d, Size: size, Atime: s.now().UnixNano(), Stored: true})
	}
	s.mu.Lock()
	if sh.granted[k] == g {
		s.endGrantLocked(k, g)
	}
	s.gaugesLocked()
	s.mu.Unlock()
	return nil
}

func (s *Store) endGrantLocked(k grantKey, g *grant) {
	delete(s.sh.granted, k)
	s.sh.grantedCost -= g.cost
	s.sh.ended[k] = s.now()
}

// grantsCountedLocked is what the live replicas' records count as reserved that the
// leader counts itself already: the grants they list that it holds or ended. A grant of
// another leader is counted in its record's reserved bytes only. s.mu held.
func (s *Store) grantsCountedLocked(listed map[string][]seenGrant) int64 {
	sh := s.sh
	var n int64
	for member, list := range listed {
		for _, g := range list {
			if g.Leader != sh.cfg.Self {
				continue
			}
			k := grantKey{member, g.Seq}
			if _, ended := sh.ended[k]; ended || sh.granted[k] != nil {
				n += g.Cost
			}
		}
	}
	return n
}

// expireGrants is the leader's round over its grants: one whose holder stopped, went
// stale, or wrote a record after asking that no longer lists it is dropped (its release
// was lost, or the holder restarted); ended grants are forgotten once no signed replay
// of their request can still be accepted. It also notes what the live records list.
func (s *Store) expireGrants(peers, live map[string]*seenRecord, now time.Time) {
	sh := s.sh
	s.mu.Lock()
	defer s.mu.Unlock()
	sh.listed = map[string][]seenGrant{}
	for m, rec := range live {
		sh.listed[m] = rec.Grants
	}
	for k, g := range sh.granted {
		rec := peers[k.member]
		var gone bool
		switch {
		case rec == nil:
			gone = now.Sub(g.at) > sh.cfg.StaleAfter
		case live[k.member] == nil:
			gone = true // stopped or stale
		case rec.Seq > k.seq:
			gone = !listsGrant(rec.Grants, k.seq, sh.cfg.Self)
		}
		if gone {
			s.endGrantLocked(k, g)
			s.m.SharedReservations.WithLabelValues(grantExpired).Inc()
		}
	}
	for k, at := range sh.ended {
		if now.Sub(at) > max(2*sh.cfg.StaleAfter, endedKept) {
			delete(sh.ended, k)
		}
	}
	s.gaugesLocked()
}

func listsGrant(list []seenGrant, seq uint64, leader string) bool {
	for _, g := range list {
		if g.Seq == seq && g.Leader == leader {
			return true
		}
	}
	return false
}

// wantRoomLocked notes that a reservation was refused for want of over bytes: the
// leader's next eviction frees at least that much, below the high watermark too, so a
// store that sits between the watermarks does not refuse every fill larger than what
// is left. s.mu held.
func (s *Store) wantRoomLocked(over int64) {
	if s.sh.leader { // a follower's refusal is the leader's to see in its own usage
		s.sh.wanted = max(s.sh.wanted, over)
	}
}

// dropGrantsLocked forgets the grants of a leadership that ended: their holders' records
// count them as reserved for the next leader. s.mu held.
func (s *Store) dropGrantsLocked() {
	s.sh.grantBook = newGrantBook()
}

// heldGrantsLocked lists the reservations this replica holds on a leader's grant, for
// its record. s.mu held.
func (s *Store) heldGrantsLocked() []seenGrant {
	var out []seenGrant
	for _, list := range s.resv {
		for _, r := range list {
			if r.leader != "" {
				out = append(out, seenGrant{Seq: r.seq, Leader: r.leader, Cost: r.cost})
			}
		}
	}
	return out
}

// reserveAtLeader asks the leader for a follower's reservation. ok false: the leader
// did not decide (no link, no leader known, this replica leads, or the call failed), and
// the caller reserves on the records' estimate.
func (s *Store) reserveAtLeader(ctx context.Context, key fill.Key, size, cost int64) (release func(stored bool), err error, ok bool) {
	sh := s.sh
	s.mu.Lock()
	leader, link := sh.usage.Leader, s.link
	if link == nil || sh.leader || leader == "" || leader == sh.cfg.Self {
		s.mu.Unlock()
		return nil, nil, false
	}
	if sh.linkDown == leader && s.now().Before(sh.linkDownUntil) {
		s.mu.Unlock()
		s.m.SharedReservations.WithLabelValues(grantFallback).Inc()
		return nil, nil, false
	}
	// Listed in this replica's records from now on, so a record taken while the leader
	// decides does not end the grant.
	sh.seq++
	r := &reservation{cost: cost, size: size, leader: leader, seq: sh.seq}
	s.reserved += cost
	s.resv[key.Digest] = append(s.resv[key.Digest], r)
	s.gaugesLocked()
	s.mu.Unlock()

	cctx, cancel := context.WithTimeout(ctx, grantTimeout)
	err = link.Reserve(cctx, leader, r.seq, key.Digest, cost)
	cancel()
	if err == nil {
		s.mu.Lock()
		if sh.linkDown == leader {
			sh.linkDown = "" // it answers again
		}
		s.mu.Unlock()
		return func(stored bool) {
			s.mu.Lock()
			s.endReservationLocked(key.Digest, r, stored)
			s.gaugesLocked()
			s.mu.Unlock()
		}, nil, true
	}
	refused := errdefs.IsResourceExhausted(err)
	s.mu.Lock()
	r.leader = "" // refused or undecided: nothing to return (a grant the leader made anyway expires)
	s.endReservationLocked(key.Digest, r, false)
	s.gaugesLocked()
	first := !refused && sh.linkDown != leader
	if !refused {
		sh.linkDown, sh.linkDownUntil = leader, s.now().Add(linkBackoff)
	}
	s.mu.Unlock()
	if refused {
		s.m.ReserveRefused.Inc()
		return nil, fmt.Errorf("%w: no room for blob %s (%d bytes): refused by the eviction leader", errdefs.ErrResourceExhausted, key.Digest, size), true
	}
	s.m.SharedReservations.WithLabelValues(grantFallback).Inc()
	level := slog.LevelDebug
	if first {
		level = slog.LevelWarn
	}
	s.log.Log(ctx, level, "the eviction leader did not decide a reservation: reserving on the records' estimate for a while", "leader", leader, "for", linkBackoff.String(), "error", err)
	return nil, nil, false
}

// returnGrant tells the leader a grant ended. A return that fails is not retried: the
// next record no longer lists the grant, and the leader drops it then.
func (s *Store) returnGrant(link LeaderLink, leader string, seq uint64, d digest.Digest, stored bool, size int64) {
	ctx, cancel := context.WithTimeout(context.Background(), grantTimeout)
	defer cancel()
	if err := link.Release(ctx, leader, seq, d, stored, size); err != nil {
		s.log.Debug("returning a reservation to the eviction leader failed: its next round drops it", "leader", leader, "digest", d, "error", err)
	}
}
