package evict

import (
	"context"
	"encoding/json"
	"fmt"
	"path"
	"strings"
	"sync"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/proxy/storage"
)

// Pins: a pattern is a registry/repository:tag glob (path.Match: '*' stays within a path
// element; a pattern without ":tag" matches every tag). A tag matches when cove-cache
// resolves it: the server revalidates tags at the origin on every pull and records
// tag/<registry>/<repository>/@<tag> -> digest, which is where pins hook in, so a pin
// follows its tag when it moves. The pinned set is the manifests these tags name and
// everything they list, index children included (containerd's images.Children over the
// stored manifests).
type pinSet struct {
	patterns []string

	mu    sync.Mutex
	roots map[string]digest.Digest // tag record key -> manifest digest
}

// ValidatePin checks a --pin pattern.
func ValidatePin(p string) error {
	if p == "" || !strings.Contains(p, "/") {
		return fmt.Errorf("pin %q: want registry/repository:tag (globs allowed)", p)
	}
	if _, err := path.Match(p, ""); err != nil {
		return fmt.Errorf("pin %q: %v", p, err)
	}
	return nil
}

func newPinSet(patterns []string) (*pinSet, error) {
	ps := &pinSet{roots: map[string]digest.Digest{}}
	for _, p := range patterns {
		if err := ValidatePin(p); err != nil {
			return nil, err
		}
		// A pattern without a tag pins every tag of the repositories it names.
		if i := strings.LastIndexByte(p, '/'); !strings.Contains(p[i:], ":") {
			p += ":*"
		}
		ps.patterns = append(ps.patterns, p)
	}
	return ps, nil
}

// reference turns tag/<registry>/<repo>/@<tag> into registry/repo:tag.
func tagReference(key string) (string, bool) {
	rest, ok := strings.CutPrefix(key, "tag/")
	if !ok {
		return "", false
	}
	i := strings.LastIndex(rest, "/@")
	if i < 0 {
		return "", false
	}
	reg, repo, ok := strings.Cut(rest[:i], "/")
	if !ok {
		return "", false
	}
	// Record keys spell an IPv6 literal's brackets as '+' (authz.KeyRegistry).
	if strings.HasPrefix(reg, "+") {
		if j := strings.IndexByte(reg[1:], '+'); j >= 0 {
			reg = "[" + reg[1:1+j] + "]" + reg[2+j:]
		}
	}
	ref := reg + "/" + repo + ":" + rest[i+2:]
	return ref, true
}

func (ps *pinSet) matches(key string) bool {
	if len(ps.patterns) == 0 {
		return false
	}
	ref, ok := tagReference(key)
	if !ok {
		return false
	}
	for _, p := range ps.patterns {
		if ok, _ := path.Match(p, ref); ok {
			return true
		}
	}
	return false
}

func (ps *pinSet) setRoot(key string, d digest.Digest) {
	ps.mu.Lock()
	ps.roots[key] = d
	ps.mu.Unlock()
}

func (ps *pinSet) rootList() map[string]digest.Digest {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	out := make(map[string]digest.Digest, len(ps.roots))
	for k, d := range ps.roots {
		out[k] = d
	}
	return out
}

// loadPins finds the pinned tags among the tag records (their number is the number of
// tags pulled, not of blobs) and resolves them before the first eviction.
func (s *Store) loadPins(ctx context.Context) {
	if len(s.pins.patterns) == 0 {
		return
	}
	err := s.inner.ListRecords(ctx, "tag/", func(key string) error {
		if !s.pins.matches(key) {
			return nil
		}
		b, err := s.inner.GetRecord(ctx, key)
		if err != nil {
			return nil
		}
		if d, ok := recordDigest(key, b); ok {
			s.pins.setRoot(key, d)
		}
		return nil
	})
	if err != nil {
		s.m.Errors.WithLabelValues("pins").Inc()
		s.log.Warn("listing tags for pins failed", "error", err)
	}
	s.resolvePins(ctx)
}

// resolvePins recomputes the pinned set: every root and what it lists, as far as the
// manifests are stored (a child manifest stored later is resolved then: storing a
// manifest writes its manifesttype record, which asks for a new resolution).
func (s *Store) resolvePins(ctx context.Context) {
	s.pinMu.Lock()
	defer s.pinMu.Unlock()
	s.resolvePinsLocked(ctx)
}

func (s *Store) resolvePinsLocked(ctx context.Context) {
	s.pinsDirty.Store(false)
	roots := s.pins.rootList()
	if len(roots) == 0 {
		return
	}
	set := map[digest.Digest]struct{}{}
	prov := provider{s.inner}
	for key, d := range roots {
		desc := ocispec.Descriptor{Digest: d, MediaType: s.manifestType(ctx, key, d)}
		err := images.Walk(ctx, images.HandlerFunc(func(ctx context.Context, desc ocispec.Descriptor) ([]ocispec.Descriptor, error) {
			set[desc.Digest] = struct{}{}
			children, err := images.Children(ctx, prov, desc)
			if errdefs.IsNotFound(err) {
				return nil, nil // not stored (yet): the digest itself is pinned
			}
			return children, err
		}), desc)
		if err != nil {
			s.m.Errors.WithLabelValues("pins").Inc()
			s.log.Warn("resolving a pin failed", "tag", key, "digest", d, "error", err)
		}
	}
	s.mu.Lock()
	changed := len(set) != len(s.pinned)
	for d := range set {
		if _, ok := s.pinned[d]; !ok {
			changed = true
		}
	}
	s.pinned = set
	s.gaugesLocked()
	s.mu.Unlock()
	if changed {
		s.log.Info("pins resolved", "tags", len(roots), "digests", len(set))
	}
}

// resolvePinsIfDirty resolves the pins before an eviction when a pinned tag moved or a
// manifest was stored since the last resolution.
// A resolution running now is waited for.
func (s *Store) resolvePinsIfDirty(ctx context.Context) {
	if len(s.pins.patterns) == 0 {
		return
	}
	s.pinMu.Lock()
	defer s.pinMu.Unlock()
	if s.pinsDirty.Load() {
		s.resolvePinsLocked(ctx)
	}
}

// manifestType is the media type of a pinned manifest: the one stored with it for the
// tag's registry, else the manifest's own mediaType field.
func (s *Store) manifestType(ctx context.Context, tagKey string, d digest.Digest) string {
	reg := strings.SplitN(strings.TrimPrefix(tagKey, "tag/"), "/", 2)[0]
	var desc ocispec.Descriptor // the record's one field is a descriptor's mediaType
	if b, err := s.inner.GetRecord(ctx, "manifesttype/"+d.Algorithm().String()+"/"+d.Encoded()+"/"+reg); err == nil &&
		json.Unmarshal(b, &desc) == nil && desc.MediaType != "" {
		return desc.MediaType
	}
	p, err := content.ReadBlob(ctx, provider{s.inner}, ocispec.Descriptor{Digest: d})
	if err != nil {
		return ""
	}
	var m ocispec.Manifest // Index has the same mediaType field
	if json.Unmarshal(p, &m) != nil {
		return ""
	}
	return m.MediaType
}

// maxManifest bounds what a pin resolution reads into memory (the server's own limit).
const maxManifest = 4 << 20

// provider serves stored manifests to containerd's images package.
type provider struct{ d storage.Driver }

func (p provider) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	b, err := p.d.Open(ctx, desc.Digest)
	if err != nil {
		return nil, err
	}
	if b.Size() > maxManifest {
		b.Close()
		return nil, fmt.Errorf("%w: %s is too large for a manifest", errdefs.ErrFailedPrecondition, desc.Digest)
	}
	return b, nil
}
