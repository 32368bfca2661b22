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

// Membership: member/<registry>/<repository>/@<alg>:<hex> says the origin answered for
// that digest in that repository, or served a manifest of that repository that lists it.
// It is long-lived (dropped when the origin says 404 for it there). A cached object is
// served for (registry, repository) only to a credential with an allowance for the
// repository AND when the object is a member of it: a valid allowance for one's own
// repository unlocks nothing of another's.

func memberKey(registry, repo string, d digest.Digest) string {
	return "member/" + keyRegistry(registry) + "/" + repo + "/@" + d.Algorithm().String() + ":" + d.Encoded()
}

func (s *Server) isMember(ctx context.Context, registry, repo string, d digest.Digest) bool {
	_, err := s.store.GetRecord(ctx, memberKey(registry, repo, d))
	return err == nil
}

// addMember records d in (registry, repo) and reports whether it was new.
func (s *Server) addMember(ctx context.Context, registry, repo string, d digest.Digest) bool {
	if d.Validate() != nil || s.isMember(ctx, registry, repo, d) {
		return false
	}
	if err := s.store.PutRecord(ctx, memberKey(registry, repo, d), nil); err != nil {
		s.log.Warn("recording membership failed", "registry", registry, "repository", repo, "digest", d, "error", err)
		return false
	}
	return true
}

func (s *Server) dropMember(ctx context.Context, registry, repo string, d digest.Digest) {
	if err := s.store.DeleteRecord(ctx, memberKey(registry, repo, d)); err != nil && !isNotFound(err) {
		s.log.Warn("dropping membership failed", "registry", registry, "repository", repo, "digest", d, "error", err)
	}
}

// addManifestMembers records what a manifest of (registry, repo) lists: its config and
// layers, or an index's manifests, and its subject.
func (s *Server) addManifestMembers(ctx context.Context, registry, repo string, body []byte) {
	var m struct {
		Config    *struct{ Digest digest.Digest }  `json:"config"`
		Layers    []struct{ Digest digest.Digest } `json:"layers"`
		Manifests []struct{ Digest digest.Digest } `json:"manifests"`
		Subject   *struct{ Digest digest.Digest }  `json:"subject"`
	}
	if json.Unmarshal(body, &m) != nil {
		return
	}
	var ds []digest.Digest
	if m.Config != nil {
		ds = append(ds, m.Config.Digest)
	}
	for _, l := range m.Layers {
		ds = append(ds, l.Digest)
	}
	for _, l := range m.Manifests {
		ds = append(ds, l.Digest)
	}
	if m.Subject != nil {
		ds = append(ds, m.Subject.Digest)
	}
	for _, d := range ds {
		s.addMember(ctx, registry, repo, d)
	}
}

// learnManifest records that manifest d belongs to (registry, repo) and, the first time,
// what it lists (read from the cache when it is there).
func (s *Server) learnManifest(ctx context.Context, registry, repo string, d digest.Digest, body []byte) {
	if !s.addMember(ctx, registry, repo, d) && body == nil {
		return
	}
	if body == nil {
		b, err := s.store.Open(ctx, d)
		if err != nil {
			return
		}
		defer b.Close()
		if b.Size() > maxManifestSize {
			return
		}
		body = make([]byte, b.Size())
		if _, err := b.ReadAt(body, 0); err != nil {
			return
		}
	}
	s.addManifestMembers(ctx, registry, repo, body)
}
