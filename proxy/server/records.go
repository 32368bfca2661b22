package server

import (
	"context"
	"encoding/json"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
)

// Records kept beside the blobs (storage.Driver records):
//
//	provenance/<alg>/<hex>/<registry>  the blob was fetched from that registry
//	manifest/<alg>/<hex>               a cached manifest's media type
//	tag/<registry>/<repository>/@<tag> the last digest the origin gave for a tag
//
// Repository path components never start with '@', so a tag record never collides with
// a repository directory.

func keyRegistry(registry string) string {
	// IPv6 literals carry brackets, which keys do not allow; '+' never appears in hosts.
	return strings.NewReplacer("[", "+", "]", "+").Replace(registry)
}

func provenanceKey(d digest.Digest, registry string) string {
	return "provenance/" + d.Algorithm().String() + "/" + d.Encoded() + "/" + keyRegistry(registry)
}

func manifestKey(d digest.Digest) string {
	return "manifest/" + d.Algorithm().String() + "/" + d.Encoded()
}

func tagKey(registry, repo, tag string) string {
	return "tag/" + keyRegistry(registry) + "/" + repo + "/@" + tag
}

type manifestRecord struct {
	MediaType string `json:"mediaType"`
}

type tagRecord struct {
	Digest    digest.Digest `json:"digest"`
	MediaType string        `json:"mediaType,omitempty"`
	Seen      time.Time     `json:"seen"`
}

// hasBlob reports whether a verified blob fetched from registry is stored, and its size.
func (s *Server) hasBlob(ctx context.Context, registry string, d digest.Digest) (int64, bool) {
	size, err := s.store.Stat(ctx, d)
	if err != nil {
		return 0, false
	}
	if _, err := s.store.GetRecord(ctx, provenanceKey(d, registry)); err != nil {
		return 0, false
	}
	return size, true
}

func (s *Server) recordProvenance(ctx context.Context, registry string, d digest.Digest) error {
	return s.store.PutRecord(ctx, provenanceKey(d, registry), nil)
}

func (s *Server) manifestMediaType(ctx context.Context, d digest.Digest) (string, bool) {
	b, err := s.store.GetRecord(ctx, manifestKey(d))
	if err != nil {
		return "", false
	}
	var rec manifestRecord
	if json.Unmarshal(b, &rec) != nil || rec.MediaType == "" {
		return "", false
	}
	return rec.MediaType, true
}

func (s *Server) rememberTag(ctx context.Context, registry, repo, tag string, d digest.Digest, mediaType string) {
	b, _ := json.Marshal(tagRecord{Digest: d, MediaType: mediaType, Seen: time.Now().UTC()})
	if err := s.store.PutRecord(ctx, tagKey(registry, repo, tag), b); err != nil {
		s.log.Warn("remembering tag failed", "registry", registry, "repository", repo, "tag", tag, "error", err)
	}
}

func isNotFound(err error) bool { return errdefs.IsNotFound(err) }
