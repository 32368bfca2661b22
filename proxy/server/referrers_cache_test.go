package server

import (
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// Kept referrers lists: fresh for the TTL, kept for the offline policy after it, bounded
// in memory (oldest first), and forgotten per subject.
func TestReferrersCache(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	c := newReferrersCache(10 * time.Second)
	c.now = func() time.Time { return now }
	subject := digest.FromString("subject")
	key := referrersSubjectKey("r.test", "team/app", subject)
	c.put(key, &referrersAnswer{body: []byte("a")})
	c.put(key+"artifactType=x", &referrersAnswer{body: []byte("b")})
	if _, fresh, ok := c.get(key); !ok || !fresh {
		t.Fatal("a list just kept is not fresh")
	}
	now = now.Add(11 * time.Second)
	if _, fresh, ok := c.get(key); !ok || fresh {
		t.Fatal("a list past the TTL must be kept, not fresh")
	}
	now = now.Add(referrersKeep)
	if _, _, ok := c.get(key); ok {
		t.Fatal("a list past the TTL and the offline keep is still there")
	}
	c.put(key+"artifactType=x", &referrersAnswer{body: []byte("b")})
	c.put(referrersSubjectKey("r.test", "team/other", subject), &referrersAnswer{body: []byte("c")})
	c.dropSubject("r.test", "team/app", subject)
	if _, _, ok := c.get(key + "artifactType=x"); ok {
		t.Fatal("dropSubject left a filtered list of the subject")
	}
	if _, _, ok := c.get(referrersSubjectKey("r.test", "team/other", subject)); !ok {
		t.Fatal("dropSubject dropped another repository's list")
	}
	big := make([]byte, referrersCacheBytes/8)
	for i := range 10 {
		now = now.Add(time.Millisecond)
		c.put(strconv.Itoa(i), &referrersAnswer{body: big})
	}
	if c.size > referrersCacheBytes {
		t.Fatalf("kept %d bytes, bound %d", c.size, referrersCacheBytes)
	}
	if _, _, ok := c.get("9"); !ok {
		t.Fatal("the newest list was evicted")
	}
	if _, _, ok := c.get("0"); ok {
		t.Fatal("the oldest list was kept past the bound")
	}
	off := newReferrersCache(-1)
	off.put(key, &referrersAnswer{body: []byte("a")})
	if _, _, ok := off.get(key); ok {
		t.Fatal("a TTL < 0 keeps lists")
	}
}
