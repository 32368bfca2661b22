package server

import (
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/authz"
	"github.com/cove-oci/cove/proxy/route"
)

// A referrers list is the repository's answer about a subject at one moment, not a
// content-addressed object: it is kept in memory, per (registry, repository, subject,
// query), fresh for the referrers TTL, and kept a while longer only for the offline
// policy. It is served only to a credential the origin allowed in that repository
// recently (authz.MayReadRepository).

const (
	// referrersCacheBytes bounds the memory all kept lists take.
	referrersCacheBytes = 32 << 20
	// referrersKeep is how long a list is kept past its freshness, for the offline
	// policy (served marked stale, to a credential with a recent allowance).
	referrersKeep = time.Hour
)

type referrersAnswer struct {
	body     []byte // the index as served (filtered when filtered)
	filtered bool   // the artifactType filter was applied (by the origin or by cove-cache)
	link     string // the origin's Link (next page), relayed
	at       time.Time
}

type referrersCache struct {
	mu      sync.Mutex
	ttl     time.Duration // < 0: nothing is kept
	size    int
	entries map[string]*referrersAnswer
	now     func() time.Time
}

func newReferrersCache(ttl time.Duration) *referrersCache {
	if ttl == 0 {
		ttl = 10 * time.Second
	}
	return &referrersCache{ttl: ttl, entries: map[string]*referrersAnswer{}, now: time.Now}
}

func referrersSubjectKey(registry, repo string, subject digest.Digest) string {
	return authz.KeyRegistry(registry) + "|" + repo + "|" + subject.String() + "|"
}

// referrersKey names one answer: the subject in the repository, and the client's query
// (artifactType; ns is not part of it).
func referrersKey(req *route.Request) string {
	return referrersSubjectKey(req.Registry, req.Repository, req.Digest) + req.Query.Encode()
}

// get returns the answer kept under key, and whether it is still fresh.
func (c *referrersCache) get(key string) (*referrersAnswer, bool, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	a, ok := c.entries[key]
	if !ok {
		return nil, false, false
	}
	age := c.now().Sub(a.at)
	if age > c.ttl+referrersKeep {
		c.remove(key)
		return nil, false, false
	}
	return a, age <= c.ttl, true
}

func (c *referrersCache) put(key string, a *referrersAnswer) {
	if c.ttl < 0 || len(a.body) > referrersCacheBytes/8 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.remove(key)
	now := c.now()
	for k, e := range c.entries {
		if c.size+len(a.body) <= referrersCacheBytes {
			break
		}
		if now.Sub(e.at) > c.ttl {
			c.remove(k)
		}
	}
	for c.size+len(a.body) > referrersCacheBytes {
		oldest := ""
		for k, e := range c.entries {
			if oldest == "" || e.at.Before(c.entries[oldest].at) {
				oldest = k
			}
		}
		c.remove(oldest)
	}
	a.at = now
	c.entries[key] = a
	c.size += len(a.body)
}

// dropSubject forgets every answer about subject in the repository: a manifest naming
// it as its subject was just pushed through cove-cache.
func (c *referrersCache) dropSubject(registry, repo string, subject digest.Digest) {
	prefix := referrersSubjectKey(registry, repo, subject)
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.entries {
		if len(k) >= len(prefix) && k[:len(prefix)] == prefix {
			c.remove(k)
		}
	}
}

func (c *referrersCache) remove(key string) {
	if e, ok := c.entries[key]; ok {
		c.size -= len(e.body)
		delete(c.entries, key)
	}
}
