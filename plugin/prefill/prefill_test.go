package prefill_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/plugin/mirror"
	"github.com/cove-oci/cove/plugin/prefill"
	"github.com/cove-oci/cove/proxy/server"
	"github.com/cove-oci/cove/proxy/storage/filesystem"
)

const accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"

type rig struct {
	origin  *peers.Registry
	img     peers.Image
	mirror  *httptest.Server
	content string
	served  map[string]int
	mu      sync.Mutex
	protect map[digest.Digest]time.Time
	prefill *prefill.Prefiller
}

func newRig(t *testing.T, layerSize int64) *rig { return newRigWith(t, layerSize, nil, nil) }

// newRigWith is newRig with cove-node's view of cove-cache replaced by wrap(cacheURL)
// (a cache that fails) and its configuration changed by tune, both optional.
func newRigWith(t *testing.T, layerSize int64, wrap func(cacheURL string) string, tune func(*prefill.Config, *mirror.Config)) *rig {
	t.Helper()
	r := &rig{served: map[string]int{}, protect: map[digest.Digest]time.Time{}}
	r.origin = peers.StartRegistry(t)
	r.img = peers.PushRandomImage(t, r.origin.Addr, "team/app:v1", 3, layerSize)
	dir := t.TempDir()
	store, err := filesystem.New(filepath.Join(dir, "cache"))
	if err != nil {
		t.Fatal(err)
	}
	cs, err := server.New(server.Config{Storage: store, SpoolDir: filepath.Join(dir, "cache", "spool"), PlainHTTP: []string{r.origin.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	cache := httptest.NewServer(cs)
	t.Cleanup(cache.Close)

	cacheURL := cache.URL
	if wrap != nil {
		cacheURL = wrap(cache.URL)
	}
	r.content = filepath.Join(dir, "io.containerd.content.v1.content")
	var h *mirror.Handler
	pcfg := prefill.Config{
		ContentRoot: r.content,
		SpoolDir:    filepath.Join(dir, "io.cove.node.v1.prefill"),
		Fetch: func(ctx context.Context, registry, repo string, d digest.Digest, hdr http.Header) (*http.Response, error) {
			return h.FetchFromCache(ctx, registry, repo, d, hdr)
		},
		Protect: func(d digest.Digest, until time.Time) { r.mu.Lock(); r.protect[d] = until; r.mu.Unlock() },
	}
	mcfg := mirror.Config{
		Caches:    []string{cacheURL},
		PlainHTTP: []string{r.origin.Addr},
		Observe: func(by, reason string, _ bool) {
			r.mu.Lock()
			r.served[by]++
			if reason != "" {
				r.served[by+"/"+reason]++
			}
			r.mu.Unlock()
		},
	}
	if tune != nil {
		tune(&pcfg, &mcfg)
	}
	p, err := prefill.New(pcfg)
	if err != nil {
		t.Fatal(err)
	}
	r.prefill = p
	mcfg.OnManifest, mcfg.Joinable = p.OnManifest, p.Joinable
	h, err = mirror.New(mcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	r.mirror = httptest.NewServer(h)
	t.Cleanup(r.mirror.Close)
	return r
}

func (r *rig) url(path string) string {
	return r.mirror.URL + path + "?ns=" + url.QueryEscape(r.origin.Addr)
}

func fileDigest(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// By the time containerd has the manifest body, every blob it names is in the store,
// verified, read-only, and protected from the GC.
func TestManifestBodyArrivesAfterPrefill(t *testing.T) {
	r := newRig(t, 2<<20)
	req, _ := http.NewRequest(http.MethodGet, r.url("/v2/team/app/manifests/"+r.img.Digest), nil)
	req.Header.Set("Accept", accept)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || digest.FromBytes(body).String() != r.img.Digest {
		t.Fatalf("manifest: %d", resp.StatusCode)
	}
	for _, d := range append([]string{r.img.Config}, r.img.Layers...) {
		p := filepath.Join(r.content, "blobs", "sha256", digest.Digest(d).Encoded())
		if got := fileDigest(t, p); got != d {
			t.Fatalf("blob %s not prefilled (got %q)", d, got)
		}
		if fi, _ := os.Stat(p); fi.Mode().Perm()&0o222 != 0 {
			t.Fatalf("prefilled blob is writable: %v", fi.Mode())
		}
		r.mu.Lock()
		until := r.protect[digest.Digest(d)]
		r.mu.Unlock()
		if time.Until(until) < 10*time.Minute {
			t.Fatalf("blob %s not protected from GC", d)
		}
	}
	for _, d := range append([]string{r.img.Config}, r.img.Layers...) {
		if n := r.origin.BlobGETs()[d]; n != 1 {
			t.Fatalf("origin GETs of %s = %d", d, n)
		}
	}
}

// A manifest by tag is not held (containerd resolves with HEAD, then GETs by digest),
// and a second GET of the manifest prefills nothing again.
func TestNoDoublePrefill(t *testing.T) {
	r := newRig(t, 1<<20)
	for range 2 {
		req, _ := http.NewRequest(http.MethodGet, r.url("/v2/team/app/manifests/"+r.img.Digest), nil)
		req.Header.Set("Accept", accept)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	for _, d := range r.img.Layers {
		if n := r.origin.BlobGETs()[d]; n != 1 {
			t.Fatalf("origin GETs of %s = %d", d, n)
		}
	}
}
