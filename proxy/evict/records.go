package evict

import (
	"context"
	"encoding/json"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Records that go with a blob (their formats are the server's and package authz's):
//
//	provenance/<alg>/<hex>/<registry>
//	manifesttype/<alg>/<hex>/<registry>
//	membership/<registry>/<repository>/@<alg>:<hex>
//	tag/<registry>/<repository>/@<tag>          (value: JSON with the digest it names)
//
// A tag record goes with the manifest it names: it serves nothing once that manifest is
// gone. Earlier versions wrote member/... and manifest/<alg>/<hex>; nothing reads them,
// and the first sweep removes them (legacyPrefixes).
var (
	ownedPrefixes  = []string{"provenance/", "manifesttype/", "membership/", "tag/"}
	legacyPrefixes = []string{"member/", "manifest/"}
)

// IndexKey is the record the index lives in.
const IndexKey = "evict/index"

// recordDigest names the blob a record goes with.
func recordDigest(key string, value []byte) (digest.Digest, bool) {
	parts := strings.Split(key, "/")
	var d digest.Digest
	switch parts[0] {
	case "provenance", "manifesttype":
		if len(parts) < 4 {
			return "", false
		}
		d = digest.NewDigestFromEncoded(digest.Algorithm(parts[1]), parts[2])
	case "membership":
		last := parts[len(parts)-1]
		if len(parts) < 4 || !strings.HasPrefix(last, "@") {
			return "", false
		}
		d = digest.Digest(last[1:])
	case "tag":
		// The tag record's fields (digest, mediaType) are a descriptor's.
		var desc ocispec.Descriptor
		if len(parts) < 4 || json.Unmarshal(value, &desc) != nil {
			return "", false
		}
		d = desc.Digest
	default:
		return "", false
	}
	if d.Validate() != nil {
		return "", false
	}
	return d, true
}

// attach notes a record with the blob it goes with (or, before the blob is stored, as
// pending for it).
func (s *Store) attach(key string, d digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.owner[key]; ok {
		if old == d {
			return
		}
		s.detachLocked(key)
	}
	s.owner[key] = d
	s.recordTouchLocked(key, d)
	if e := s.blobs[d]; e != nil {
		e.records[key] = struct{}{}
		s.stored += recordCost
	} else {
		p := s.pending[d]
		if p == nil {
			p = &pending{keys: map[string]struct{}{}, since: s.now().UnixNano()}
			s.pending[d] = p
		}
		p.keys[key] = struct{}{}
	}
	s.dirty = true
	s.gaugesLocked()
}

func (s *Store) detach(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.detachLocked(key)
	s.gaugesLocked()
}

func (s *Store) detachLocked(key string) {
	d, ok := s.owner[key]
	if !ok {
		return
	}
	delete(s.owner, key)
	if e := s.blobs[d]; e != nil {
		if _, ok := e.records[key]; ok {
			delete(e.records, key)
			s.stored -= recordCost
		}
	}
	if p := s.pending[d]; p != nil {
		delete(p.keys, key)
		if len(p.keys) == 0 {
			delete(s.pending, d)
		}
	}
	s.dirty = true
}

func (s *Store) deleteRecords(ctx context.Context, keys []string) {
	for _, k := range keys {
		if err := s.inner.DeleteRecord(ctx, k); err != nil && !errdefs.IsNotFound(err) {
			s.m.Errors.WithLabelValues("delete-record").Inc()
			s.log.Warn("removing a record failed", "key", k, "error", err)
		}
	}
}

func keysOf(m map[string]struct{}) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
