package server

import (
	"context"
	"encoding/json"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/authz"
)

// Records kept beside the blobs (storage.Driver records):
//
//	provenance/<alg>/<hex>/<registry>       the blob was fetched from that registry
//	manifesttype/<alg>/<hex>/<registry>     a cached manifest's media type, as that registry gave it
//	tag/<registry>/<repository>/@<tag>      the last digest the origin gave for a tag
//	membership/...                          the origin's word that a repository holds a digest (package authz)
//
// Repository path components never start with '@', so a tag record never collides with
// a repository directory.

func provenanceKey(d digest.Digest, registry string) string {
	return "provenance/" + d.Algorithm().String() + "/" + d.Encoded() + "/" + authz.KeyRegistry(registry)
}

// manifestTypeKey is per registry: the same manifest bytes served by another registry
// with another Content-Type must not change what this registry's clients receive.
// (Stores written before kept one global manifest/<alg>/<hex> record; it is not read.)
func manifestTypeKey(d digest.Digest, registry string) string {
	return "manifesttype/" + d.Algorithm().String() + "/" + d.Encoded() + "/" + authz.KeyRegistry(registry)
}

func tagKey(registry, repo, tag string) string {
	return "tag/" + authz.KeyRegistry(registry) + "/" + repo + "/@" + tag
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
// A pushed object still being committed is waited for: the first pull after a push is
// a hit.
func (s *Server) hasBlob(ctx context.Context, registry string, d digest.Digest) (int64, bool) {
	s.waitStored(ctx, registry, d)
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

func (s *Server) manifestMediaType(ctx context.Context, registry string, d digest.Digest) (string, bool) {
	b, err := s.store.GetRecord(ctx, manifestTypeKey(d, registry))
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
