package preheat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/platforms"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// DefaultParallel is how many blobs are fetched at once.
const DefaultParallel = 4

// maxDepth bounds nested indexes.
const maxDepth = 8

// Options configure Run.
type Options struct {
	// Cache is the cove-cache URL (http(s)://HOST[:PORT]).
	Cache *url.URL
	// Platforms selects the children of an index: those matching any of these. Empty
	// means the platform of this machine, unless AllPlatforms.
	Platforms []ocispec.Platform
	// AllPlatforms takes every child of an index.
	AllPlatforms bool
	// Auth returns the login for an origin registry (authn.Anonymous for none); its
	// user name must be <registry>/<user>, the form cove-cache's token broker binds.
	Auth func(registry string) authn.Authenticator
	// Transport is the base HTTP transport (nil: a clone of http.DefaultTransport).
	Transport http.RoundTripper
	// Parallel bounds blob fetches at once (0: DefaultParallel).
	Parallel int
	// Progress receives progress events (nil: none).
	Progress *Progress
}

// Result is what preheating one target came to.
type Result struct {
	Target
	Resolved  digest.Digest // the manifest or index the reference named
	Manifests int           // manifests and indexes fetched
	Blobs     int           // configs and layers of this target
	Bytes     int64         // their bytes
	Err       error         // nil when every object is in the cache
}

// blob is one config or layer to fetch, and the targets that need it.
type blob struct {
	client  *repoClient
	desc    ocispec.Descriptor
	targets []int
}

// Run preheats every target through the cache: first it resolves each target's
// manifests (so the total is known), then fetches the blobs, Parallel at once, each
// repository's blob once. A failure fails the targets that needed it and no other.
func Run(ctx context.Context, o Options, targets []Target) []Result {
	if o.Parallel <= 0 {
		o.Parallel = DefaultParallel
	}
	if o.Transport == nil {
		o.Transport = http.DefaultTransport.(*http.Transport).Clone()
	}
	if o.Progress == nil {
		o.Progress = NewProgress(nil, false)
	}
	match := platforms.Any(platforms.DefaultSpec())
	if len(o.Platforms) > 0 {
		match = platforms.Any(o.Platforms...)
	}
	if o.AllPlatforms {
		match = platforms.All
	}
	results := make([]Result, len(targets))
	var order []string
	blobs := map[string]*blob{} // <registry>/<repo>@<digest>
	clients := map[string]*repoClient{}
	for i, t := range targets {
		results[i].Target = t
		c := clients[t.name()]
		if c == nil {
			auth := authn.Anonymous
			if o.Auth != nil {
				auth = o.Auth(t.Registry)
			}
			var err error
			if c, err = newRepoClient(ctx, o.Cache, o.Transport, auth, t); err != nil {
				results[i].Err = err
				o.Progress.Failed(t.Ref, err)
				continue
			}
			clients[t.name()] = c
		}
		w := walker{ctx: ctx, client: c, match: match, all: o.AllPlatforms}
		root, err := w.resolve(t)
		results[i].Resolved, results[i].Manifests = root, w.manifests
		if err != nil {
			results[i].Err = err
			o.Progress.Failed(t.Ref, err)
			continue
		}
		for _, d := range w.blobs {
			key := t.name() + "@" + d.Digest.String()
			b := blobs[key]
			if b == nil {
				b = &blob{client: c, desc: d}
				blobs[key] = b
				order = append(order, key)
			}
			b.targets = append(b.targets, i)
			results[i].Blobs++
			results[i].Bytes += d.Size
		}
		o.Progress.Resolved(t.Ref, root, w.manifests, results[i].Blobs, results[i].Bytes)
	}

	var total int64
	for _, k := range order {
		total += blobs[k].desc.Size
	}
	if len(order) > 0 {
		o.Progress.Begin(len(order), total)
	}
	var mu sync.Mutex
	sem := make(chan struct{}, o.Parallel)
	var wg sync.WaitGroup
	for _, k := range order {
		b := blobs[k]
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			buf := make([]byte, 256<<10)
			var err error
			for attempt := 1; ; attempt++ {
				var read int64
				err = b.client.fetchBlob(ctx, b.desc, buf, func(n int64) { read += n; o.Progress.Add(n) })
				if err == nil {
					break
				}
				o.Progress.Add(-read) // the bar counts what is in the cache, not attempts
				if attempt == blobAttempts || !retryable(ctx, err) {
					break
				}
				time.Sleep(time.Duration(attempt) * 500 * time.Millisecond)
			}
			if err != nil {
				err = fmt.Errorf("blob %s: %w", b.desc.Digest, err)
				mu.Lock()
				for _, i := range b.targets {
					results[i].Err = errors.Join(results[i].Err, err)
				}
				mu.Unlock()
			}
			o.Progress.BlobDone(b.desc, err)
		}()
	}
	wg.Wait()
	o.Progress.End()
	return results
}

// blobAttempts is how often a blob is tried when the failure may pass (a dropped
// connection, a stall, a 5xx): cove-cache's fill goes on meanwhile, so a retry costs
// the origin nothing more.
const blobAttempts = 3

// retryable reports whether a failed blob fetch is worth another try: not when the
// cache answered 4xx (unknown, refused) or sent a whole body that is not the blob, and
// not once the run is cancelled.
func retryable(ctx context.Context, err error) bool {
	if ctx.Err() != nil || errors.Is(err, errDigest) || errors.Is(err, errSize) {
		return false
	}
	var te *transport.Error
	if errors.As(err, &te) && te.StatusCode < 500 {
		return false
	}
	return true
}

// walker resolves one target's manifests and lists its blobs.
type walker struct {
	ctx       context.Context
	client    *repoClient
	match     platforms.MatchComparer
	all       bool
	manifests int
	blobs     []ocispec.Descriptor
	seen      map[digest.Digest]bool
}

// resolve fetches the target's manifest or index and everything below it that the
// platform selection keeps, and returns the digest the reference resolved to.
func (w *walker) resolve(t Target) (digest.Digest, error) {
	w.seen = map[digest.Digest]bool{}
	ref := t.Tag
	if t.Digest != "" {
		ref = t.Digest.String()
	}
	m, err := w.client.getManifest(w.ctx, ref, t.Digest)
	if err != nil {
		return "", err
	}
	return m.desc.Digest, w.visit(m, 0, true, false)
}

// child fetches an index's child and visits it; metadataOnly keeps a manifest's config
// and leaves its layers.
func (w *walker) child(d ocispec.Descriptor, depth int, metadataOnly bool) error {
	if w.seen[d.Digest] {
		return nil
	}
	w.seen[d.Digest] = true
	cm, err := w.client.getManifest(w.ctx, d.Digest.String(), d.Digest)
	if err != nil {
		return fmt.Errorf("manifest %s: %w", d.Digest, err)
	}
	if cm.desc.Size != d.Size {
		return fmt.Errorf("manifest %s: %d bytes, the index says %d", d.Digest, cm.desc.Size, d.Size)
	}
	if cm.desc.MediaType == "" {
		cm.desc.MediaType = d.MediaType
	}
	return w.visit(cm, depth+1, false, metadataOnly)
}

// visit lists what m references: an index's children (fetched), a manifest's config
// and layers.
func (w *walker) visit(m manifest, depth int, top, metadataOnly bool) error {
	w.manifests++
	switch mt := m.desc.MediaType; {
	case images.IsIndexType(mt):
		var idx ocispec.Index
		if err := json.Unmarshal(m.body, &idx); err != nil {
			return fmt.Errorf("index %s: %v", m.desc.Digest, err)
		}
		if depth >= maxDepth {
			return fmt.Errorf("index %s: indexes nested deeper than %d", m.desc.Digest, maxDepth)
		}
		var kept, others []ocispec.Descriptor
		for _, child := range idx.Manifests {
			// As containerd's images.FilterPlatforms: a child without a platform is kept.
			if w.all || child.Platform == nil || w.match.Match(*child.Platform) {
				kept = append(kept, child)
			} else if images.IsManifestType(child.MediaType) {
				others = append(others, child)
			}
		}
		if len(kept) == 0 && top {
			return fmt.Errorf("index %s has no manifest for the platforms asked for (it has %s)", m.desc.Digest, listPlatforms(idx.Manifests))
		}
		for _, child := range kept {
			if err := w.child(child, depth, false); err != nil {
				return err
			}
		}
		// The other platforms' manifests and configs, as containerd fetches them by
		// default (ctr image pull without --skip-metadata: remotes.FilterManifestByPlatformHandler).
		for _, child := range others {
			if err := w.child(child, depth, true); err != nil {
				return err
			}
		}
		return nil
	case images.IsManifestType(mt) || mt == "":
		var man ocispec.Manifest
		if err := json.Unmarshal(m.body, &man); err != nil {
			return fmt.Errorf("manifest %s: %v", m.desc.Digest, err)
		}
		if man.Config.Digest == "" {
			return fmt.Errorf("manifest %s (%s) has no config: not an image manifest or index", m.desc.Digest, mediaTypeOrNone(mt))
		}
		blobs := append([]ocispec.Descriptor{man.Config}, man.Layers...)
		if metadataOnly {
			blobs = blobs[:1]
		}
		for _, d := range blobs {
			// Non-distributable layers live at their urls, not in the registry.
			if images.IsNonDistributable(d.MediaType) || w.seen[d.Digest] {
				continue
			}
			if err := d.Digest.Validate(); err != nil || d.Size < 0 {
				return fmt.Errorf("manifest %s: bad descriptor %q: %v", m.desc.Digest, d.Digest, err)
			}
			w.seen[d.Digest] = true
			w.blobs = append(w.blobs, ocispec.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: d.Size})
		}
		return nil
	default:
		return fmt.Errorf("%s is a %s, not an image manifest or index", m.desc.Digest, mt)
	}
}

func mediaTypeOrNone(mt string) string {
	if mt == "" {
		return "no media type"
	}
	return mt
}

func listPlatforms(ds []ocispec.Descriptor) string {
	var out []string
	for _, d := range ds {
		if d.Platform != nil {
			out = append(out, platforms.Format(*d.Platform))
		}
	}
	if len(out) == 0 {
		return "none with a platform"
	}
	return strings.Join(out, ", ")
}
