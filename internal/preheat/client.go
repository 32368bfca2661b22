// Package preheat fills a running cove-cache ahead of use. It is a client of cove-cache
// like any other: every manifest, index child, config and layer of an image is fetched
// through the cache's URL (the registry named as the first path element, as docker and
// crane do), read, verified against its digest and discarded. cove-cache authorizes each
// request at the origin with the client's own credentials and keeps what it fetched, so a
// node's first pull is a hit.
package preheat

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/distribution/reference"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/internal/version"
	"github.com/cove-oci/cove/proxy/route"
)

// maxManifestSize bounds a manifest or index read whole (cove-cache's own push limit).
const maxManifestSize = 4 << 20

// Target is one image reference to preheat, in the origin's naming.
type Target struct {
	Ref      string        // as given
	Registry string        // canonical origin registry host (docker.io for Docker Hub)
	Repo     string        // repository at that registry (library/alpine)
	Tag      string        // set when the reference has a tag and no digest
	Digest   digest.Digest // set when the reference names a digest
}

// ParseTarget parses an image reference naming its origin registry (ghcr.io/team/app:v1;
// a reference without a registry is Docker Hub's, without a tag or digest is :latest).
func ParseTarget(s string) (Target, error) {
	named, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		return Target{}, fmt.Errorf("reference %q: %v", s, err)
	}
	reg, err := route.NormalizeHost(reference.Domain(named))
	if err != nil {
		return Target{}, fmt.Errorf("reference %q: registry: %v", s, err)
	}
	t := Target{Ref: s, Registry: reg, Repo: reference.Path(named)}
	if d, ok := named.(reference.Digested); ok {
		t.Digest = d.Digest()
	} else if tg, ok := named.(reference.Tagged); ok {
		t.Tag = tg.Tag()
	} else {
		t.Tag = "latest"
	}
	if err := route.ValidateRepository(t.Repo); err != nil {
		return Target{}, fmt.Errorf("reference %q: %v", s, err)
	}
	return t, nil
}

// name is the repository as cove-cache's path-prefix routing names it.
func (t Target) name() string { return t.Registry + "/" + t.Repo }

// manifestAccept is every manifest and index type asked for.
var manifestAccept = strings.Join([]string{
	ocispec.MediaTypeImageIndex, ocispec.MediaTypeImageManifest,
	images.MediaTypeDockerSchema2ManifestList, images.MediaTypeDockerSchema2Manifest,
}, ", ")

// repoClient reads one repository through the cache, authenticated for it.
type repoClient struct {
	http *http.Client
	base string // CACHE/v2/<registry>/<repo>
}

// newRepoClient pings the cache for the target's registry and sets up authentication
// for pulls from its repository: cove-cache's own token endpoint brokers the origin's
// token for the login auth carries (user <registry>/<user>), so nothing but the cache
// is contacted.
func newRepoClient(ctx context.Context, cache *url.URL, base http.RoundTripper, auth authn.Authenticator, t Target) (*repoClient, error) {
	var opts []name.Option
	if cache.Scheme == "http" {
		opts = append(opts, name.Insecure)
	}
	reg, err := name.NewRegistry(cache.Host, opts...)
	if err != nil {
		return nil, fmt.Errorf("cache host %q: %v", cache.Host, err)
	}
	scope := "repository:" + t.name() + ":pull"
	rt, err := transport.NewWithContext(ctx, reg, auth, &cacheTransport{cache: cache, inner: base}, []string{scope})
	if err != nil {
		return nil, fmt.Errorf("authenticating at the cache: %w", err)
	}
	u := *cache
	u.Path = "/v2/" + t.name()
	return &repoClient{http: &http.Client{Transport: rt}, base: u.String()}, nil
}

// cacheTransport sends requests for the cache's host with the cache's scheme (so an
// http:// cache is never tried over TLS first) and a User-Agent of its own.
type cacheTransport struct {
	cache *url.URL
	inner http.RoundTripper
}

func (c *cacheTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Host == c.cache.Host {
		r = r.Clone(r.Context())
		r.URL.Scheme = c.cache.Scheme
		r.Header.Set("User-Agent", "cove-cache-preheat/"+version.Version)
	}
	return c.inner.RoundTrip(r)
}

// manifest is a manifest or index as fetched and verified.
type manifest struct {
	desc ocispec.Descriptor
	body []byte
}

// getManifest fetches a manifest by tag or digest and verifies it: against the digest
// asked for, else against the Docker-Content-Digest the cache answered with.
func (c *repoClient) getManifest(ctx context.Context, tagOrDigest string, want digest.Digest) (manifest, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/manifests/"+tagOrDigest, nil)
	if err != nil {
		return manifest{}, err
	}
	req.Header.Set("Accept", manifestAccept)
	resp, err := c.http.Do(req)
	if err != nil {
		return manifest{}, err
	}
	defer resp.Body.Close()
	if err := transport.CheckError(resp, http.StatusOK); err != nil {
		return manifest{}, err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	if err != nil {
		return manifest{}, fmt.Errorf("reading manifest %s: %w", tagOrDigest, err)
	}
	if len(body) > maxManifestSize {
		return manifest{}, fmt.Errorf("manifest %s is larger than %d bytes", tagOrDigest, maxManifestSize)
	}
	if want == "" {
		if h := resp.Header.Get("Docker-Content-Digest"); h != "" {
			if want, err = digest.Parse(h); err != nil {
				return manifest{}, fmt.Errorf("manifest %s: bad Docker-Content-Digest %q", tagOrDigest, h)
			}
		}
	}
	got := digest.Canonical.FromBytes(body)
	if want != "" {
		if !want.Algorithm().Available() {
			return manifest{}, fmt.Errorf("manifest %s: unsupported digest algorithm %s", tagOrDigest, want.Algorithm())
		}
		if got = want.Algorithm().FromBytes(body); got != want {
			return manifest{}, fmt.Errorf("manifest %s: body digest %s, want %s", tagOrDigest, got, want)
		}
	}
	mt, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if !images.IsIndexType(mt) && !images.IsManifestType(mt) {
		var probe ocispec.Manifest // mediaType, config and manifests are all it needs
		if err := json.Unmarshal(body, &probe); err != nil {
			return manifest{}, fmt.Errorf("manifest %s: not JSON: %v", tagOrDigest, err)
		}
		mt = probe.MediaType
	}
	return manifest{desc: ocispec.Descriptor{MediaType: mt, Digest: got, Size: int64(len(body))}, body: body}, nil
}

var (
	// errSize is a blob whose length is not the one its descriptor gives.
	errSize = errors.New("size mismatch")
	// errDigest is a blob whose bytes are not the digest's.
	errDigest = errors.New("digest mismatch")
	// errStalled is a blob whose bytes stopped coming for stallTimeout.
	errStalled = errors.New("the cache sent nothing for too long")
)

// stallTimeout ends a blob fetch that receives nothing for this long (cove-cache sends
// headers at once and bytes as the origin sends them).
var stallTimeout = time.Minute

// fetchBlob reads a blob through the cache into the discard pile, counting bytes with
// add as they arrive, and verifies its size and digest.
func (c *repoClient) fetchBlob(ctx context.Context, d ocispec.Descriptor, buf []byte, add func(int64)) error {
	// A body that stops coming ends the request after stallTimeout without a byte.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stall := time.AfterFunc(stallTimeout, func() { cancel(fmt.Errorf("%w (%v)", errStalled, stallTimeout)) })
	defer stall.Stop()
	add = func(add func(int64)) func(int64) {
		return func(n int64) { stall.Reset(stallTimeout); add(n) }
	}(add)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/blobs/"+d.Digest.String(), nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := transport.CheckError(resp, http.StatusOK); err != nil {
		return err
	}
	if !d.Digest.Algorithm().Available() {
		return fmt.Errorf("unsupported digest algorithm %s", d.Digest.Algorithm())
	}
	v := d.Digest.Verifier()
	n, err := io.CopyBuffer(io.MultiWriter(v, countWriter(add)), io.LimitReader(resp.Body, d.Size+1), buf)
	if err != nil {
		if cause := context.Cause(ctx); errors.Is(cause, errStalled) {
			err = cause
		}
		return fmt.Errorf("after %d bytes: %w", n, err)
	}
	if n != d.Size {
		return fmt.Errorf("%w: got %d bytes, want %d", errSize, n, d.Size)
	}
	if !v.Verified() {
		return fmt.Errorf("%w: the bytes are not %s", errDigest, d.Digest)
	}
	return nil
}

type countWriter func(int64)

func (f countWriter) Write(p []byte) (int, error) { f(int64(len(p))); return len(p), nil }
