package server

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/httpx"
)

// credentialHash is the only form in which a client's credentials are kept: a SHA-256 of
// the Authorization header, in memory.
func credentialHash(h http.Header) string {
	sum := sha256.Sum256([]byte(httpx.CredentialKey(h)))
	return hex.EncodeToString(sum[:])
}

// owner identifies (credential, registry, repository): requests with the same owner as a
// fill were authorized by the origin's answer to that fill.
func owner(h http.Header, registry, repo string) string {
	return credentialHash(h) + "|" + registry + "|" + repo
}

// authzCache remembers, briefly, that the origin let a credential read one object in one
// repository. Only yes answers are kept; a refusal is asked again every time.
type authzCache struct {
	ttl time.Duration
	mu  sync.Mutex
	m   map[authzKey]time.Time
}

type authzKey struct {
	owner  string
	digest digest.Digest
}

func newAuthzCache(ttl time.Duration) *authzCache {
	return &authzCache{ttl: ttl, m: map[authzKey]time.Time{}}
}

func (c *authzCache) allowed(owner string, d digest.Digest) bool {
	if c.ttl < 0 {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	exp, ok := c.m[authzKey{owner, d}]
	if ok && time.Now().Before(exp) {
		return true
	}
	if ok {
		delete(c.m, authzKey{owner, d})
	}
	return false
}

func (c *authzCache) allow(owner string, d digest.Digest) {
	if c.ttl <= 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if len(c.m) > 100000 {
		// Bound memory: drop expired entries, and everything if that was not enough.
		for k, exp := range c.m {
			if now.After(exp) {
				delete(c.m, k)
			}
		}
		if len(c.m) > 100000 {
			clear(c.m)
		}
	}
	c.m[authzKey{owner, d}] = now.Add(c.ttl)
}
