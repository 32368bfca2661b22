package cluster

import (
	"sync"
	"time"
)

// Ring answers who owns a key among the live members, from this replica's view: the
// members of a Membership, less those this replica found down recently. A member is
// marked down when a request to it fails to connect or times out, for a short time
// (DownFor), so a dead owner costs one failed connection per DownFor, not one per
// request, and comes back by itself when it is reachable again.
type Ring struct {
	members Membership
	self    string
	downFor time.Duration
	now     func() time.Time

	mu      sync.Mutex
	down    map[string]time.Time // member -> until when it is skipped
	leaving map[string]time.Time // member -> until when it is draining (leaving.go)
}

// DefaultDownFor is how long a member that failed a request is skipped.
const DefaultDownFor = 10 * time.Second

// RingOption configures a Ring.
type RingOption func(*Ring)

// WithDownFor sets how long a member marked down is skipped (default DefaultDownFor).
func WithDownFor(d time.Duration) RingOption { return func(r *Ring) { r.downFor = d } }

// withClock replaces the clock (tests).
func withClock(now func() time.Time) RingOption { return func(r *Ring) { r.now = now } }

// NewRing returns the ring of m as seen by the member self (its own URL, normalized by
// ParseMember). self is always a candidate owner, even when m does not list it (yet):
// a replica can always fetch from the origin itself.
func NewRing(m Membership, self string, opts ...RingOption) *Ring {
	r := &Ring{members: m, self: self, downFor: DefaultDownFor, now: time.Now, down: map[string]time.Time{}, leaving: map[string]time.Time{}}
	for _, o := range opts {
		o(r)
	}
	return r
}

// Self is this replica's own member URL.
func (r *Ring) Self() string { return r.self }

// Owners returns the candidate owners of key, best first: the live members (self
// always among them) in rendezvous rank, without those marked down or leaving. The list
// ends at self: a replica never asks a member ranked below itself, it fetches itself
// instead; a replica that is leaving itself comes last, after every other live member.
func (r *Ring) Owners(key string) []string { return r.Route(key).Owners }

// MarkDown skips member for DownFor. It reports whether the member was up until now
// (the first failure of a run of them), so callers count and log each outage once.
func (r *Ring) MarkDown(member string) bool {
	if member == r.self {
		return false
	}
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	until, was := r.down[member]
	r.down[member] = now.Add(r.downFor)
	return !was || !now.Before(until)
}
