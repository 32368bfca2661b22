package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/server"
	"github.com/cove-oci/cove/proxy/storage/filesystem"
)

// gatedStore is the real filesystem driver whose blob writes wait until gate is closed:
// a cache disk slow to take what a push brings.
type gatedStore struct {
	*filesystem.Driver
	gate chan struct{}
}

func (g *gatedStore) AdoptFile(ctx context.Context, d digest.Digest, size int64, path string) error {
	<-g.gate
	return g.Driver.AdoptFile(ctx, d, size, path)
}

func (g *gatedStore) Put(ctx context.Context, d digest.Digest, size int64, r io.Reader) error {
	<-g.gate
	return g.Driver.Put(ctx, d, size, r)
}

// pushBlobThrough pushes b through the cache (POST, then PUT with the bytes and digest).
func pushBlobThrough(t *testing.T, c *cache, originAddr, repo string, b []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(b)
	resp, body := send(t, http.MethodPost, c.url(originAddr, "/v2/"+repo+"/blobs/uploads/"), nil, nil)
	expect(t, "POST", resp, body, http.StatusAccepted)
	loc := resolve(t, c, originAddr, resp.Header.Get("Location"))
	resp, body = send(t, http.MethodPut, withQuery(loc, "digest", d.String()), b, map[string]string{"Content-Type": "application/octet-stream"})
	expect(t, "PUT "+d.String(), resp, body, http.StatusCreated)
	return d
}

// A push is answered on the origin's word without waiting for the cache's disk: with the
// store holding every write, blob and manifest PUTs get their 201s. A pull that comes
// while the pushed objects are still being stored waits for them and is a hit: the
// origin sees no blob or manifest GET.
func TestPushCommitsInTheBackground(t *testing.T) {
	origin := peers.StartRegistry(t)
	gate := make(chan struct{})
	var once sync.Once
	open := func() { once.Do(func() { close(gate) }) }
	t.Cleanup(open)
	c := newCacheWith(t, func(cfg *server.Config) {
		cfg.Storage = &gatedStore{Driver: cfg.Storage.(*filesystem.Driver), gate: gate}
	}, origin.Addr)

	layer := randomBytes(t, 1<<20+17)
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	ld := pushBlobThrough(t, c, origin.Addr, "team/app", layer)
	cd := pushBlobThrough(t, c, origin.Addr, "team/app", config)
	manifest, err := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: cd, Size: int64(len(config))},
		Layers:    []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageLayer, Digest: ld, Size: int64(len(layer))}},
	})
	if err != nil {
		t.Fatal(err)
	}
	md := digest.FromBytes(manifest)
	put := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPut, c.url(origin.Addr, "/v2/team/app/manifests/v1"), bytes.NewReader(manifest))
		req.Header.Set("Content-Type", ocispec.MediaTypeImageManifest)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			put <- 0
			return
		}
		resp.Body.Close()
		put <- resp.StatusCode
	}()
	select {
	case status := <-put:
		if status != http.StatusCreated {
			t.Fatalf("manifest PUT: %d", status)
		}
	case <-time.After(time.Minute): // far beyond a PUT's time, and beyond waiting for the store (30 s)
		t.Fatal("the manifest PUT waited for the cache's store")
	}
	if c.srv.PendingStores() == 0 {
		t.Fatal("nothing pending although the store has taken nothing")
	}

	// Pulls arriving while the store is held.
	before := len(origin.Requests())
	type got struct {
		what   string
		status int
		sum    digest.Digest
	}
	results := make(chan got, 3)
	for _, p := range []struct{ what, path string }{
		{md.String(), "/v2/team/app/manifests/v1"},
		{cd.String(), "/v2/team/app/blobs/" + cd.String()},
		{ld.String(), "/v2/team/app/blobs/" + ld.String()},
	} {
		go func() {
			resp, body, err := do(t, http.MethodGet, c.url(origin.Addr, p.path), map[string]string{"Accept": ocispec.MediaTypeImageManifest})
			if err != nil {
				results <- got{what: p.what}
				return
			}
			results <- got{p.what, resp.StatusCode, digest.FromBytes(body)}
		}()
	}
	// Time for the GETs to reach the cache: a GET arriving after the gate opens only
	// weakens the test, it never fails it.
	time.Sleep(time.Second)
	open()
	for range 3 {
		g := <-results
		if g.status != http.StatusOK || g.sum.String() != g.what {
			t.Errorf("pull of %s while it was being stored: %d, digest %s", g.what, g.status, g.sum)
		}
	}
	if n := originGETs(origin, before, "/blobs/") + originGETs(origin, before, "/manifests/"); n != 0 {
		t.Fatalf("the first pull after the push cost %d origin GETs", n)
	}
	c.settle(t)
	for _, d := range []digest.Digest{md, cd, ld} {
		if _, err := c.store.Stat(t.Context(), d); err != nil {
			t.Fatalf("%s not stored: %v", d, err)
		}
	}
}
