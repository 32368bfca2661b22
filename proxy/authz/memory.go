package authz

import (
	"net/http"
	"sync"
	"time"
)

// allowances remembers when the origin last let a credential read from a repository:
// (credential hash, registry, repository) -> time of the origin's last yes. It is learned
// from any 200 the origin gave that credential in that repository. A yes younger than the
// TTL lets cached objects of the repository be served without asking again; an older one
// still counts for the offline policy, up to its own bound. A refusal is never kept: the
// next request asks the origin again.
type allowances struct {
	ttl  time.Duration // < 0: never reuse
	keep time.Duration // how long a yes is remembered at all (max of ttl and the offline bound)
	mu   sync.Mutex
	m    map[string]time.Time
	now  func() time.Time
}

func newAllowances(ttl, offlineMaxAge time.Duration) *allowances {
	return &allowances{ttl: ttl, keep: max(ttl, offlineMaxAge), m: map[string]time.Time{}, now: time.Now}
}

// fresh reports whether owner has a yes younger than the TTL.
func (a *allowances) fresh(owner string) bool {
	if a.ttl <= 0 {
		return false
	}
	age, ok := a.age(owner)
	return ok && age < a.ttl
}

// age returns how old owner's last yes is.
func (a *allowances) age(owner string) (time.Duration, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	t, ok := a.m[owner]
	if !ok {
		return 0, false
	}
	return a.now().Sub(t), true
}

// allow records the origin's yes for owner now.
func (a *allowances) allow(owner string) {
	if a.keep <= 0 {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.now()
	if len(a.m) >= 100000 {
		// Bound memory: drop what is too old to matter, and everything if that was not enough.
		for k, t := range a.m {
			if now.Sub(t) > a.keep {
				delete(a.m, k)
			}
		}
		if len(a.m) >= 100000 {
			clear(a.m)
		}
	}
	a.m[owner] = now
}

// challenges remembers the origin's 401 to a credential for a repository, as briefly as
// an allowance (a refusal is never kept longer than a yes), so that the anonymous first
// request containerd sends before fetching a token is answered without a round trip to
// the origin. Only 401s are kept: they carry the challenge and grant nothing.
type challenges struct {
	ttl time.Duration
	mu  sync.Mutex
	m   map[string]challenge
	now func() time.Time
}

type challenge struct {
	header http.Header // the origin's response headers (WWW-Authenticate among them)
	at     time.Time
}

func newChallenges(ttl time.Duration) *challenges {
	return &challenges{ttl: ttl, m: map[string]challenge{}, now: time.Now}
}

// get returns the origin's remembered 401 headers for owner, if recent.
func (c *challenges) get(owner string) (http.Header, bool) {
	if c.ttl <= 0 {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ch, ok := c.m[owner]
	if !ok || c.now().Sub(ch.at) >= c.ttl {
		delete(c.m, owner)
		return nil, false
	}
	return ch.header, true
}

// remember keeps the origin's 401 headers for owner.
func (c *challenges) remember(owner string, h http.Header) {
	if c.ttl <= 0 || h.Get("Www-Authenticate") == "" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= 100000 {
		clear(c.m)
	}
	c.m[owner] = challenge{header: h.Clone(), at: c.now()}
}

// forget drops owner's remembered 401 (the origin has just said yes).
func (c *challenges) forget(owner string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, owner)
}
