// Package e2e runs cove-cache as its real binary between real containerd instances and a
// real distribution registry as the origin.
package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func allBlobs(img peers.Image) []string { return append([]string{img.Config}, img.Layers...) }

// A ctr pull and a crictl pull through cove-cache; the second, fresh containerd costs the
// origin no blob GET at all.
func TestPullThroughCacheWithCtrAndCrictl(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 3, 4<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)

	first := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := first.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, first, img)
	afterFirst := origin.BlobGETs()
	for _, d := range allBlobs(img) {
		if afterFirst[d] != 1 {
			t.Errorf("origin GETs of %s after the first pull = %d, want 1", d, afterFirst[d])
		}
	}
	if misses := cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="miss"`); misses < float64(len(allBlobs(img))) {
		t.Fatalf("cove-cache saw %v blob misses: the pull did not go through it", misses)
	}

	second := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := second.CrictlPull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, second, img)
	afterSecond := origin.BlobGETs()
	for _, d := range allBlobs(img) {
		if afterSecond[d] != afterFirst[d] {
			t.Errorf("the second pull made %d new origin GETs of %s, want 0", afterSecond[d]-afterFirst[d], d)
		}
	}
	if hits := cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="hit"`); hits < float64(len(allBlobs(img))) {
		t.Fatalf("blob hits = %v, want at least %d", hits, len(allBlobs(img)))
	}
	if sent := cove.Metric(t, "cove_bytes_sent_total", `source="cache"`); sent < float64(img.Size) {
		t.Fatalf("bytes sent from cache = %v, want at least %d", sent, img.Size)
	}
}

// Eight fresh containerd instances pull one cold image at once: exactly one origin GET
// per blob.
func TestEightNodesColdPullOneOriginFetch(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/big:v1", 3, 16<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	nodes := make([]*peers.Containerd, 8)
	for i := range nodes {
		nodes[i] = peers.StartContainerd(t, peers.WithMirror(cove.URL))
	}
	var wg sync.WaitGroup
	errs := make([]error, len(nodes))
	for i, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = n.Pull(ctx, img.Ref)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
		peers.CheckPulled(t, ctx, nodes[i], img)
	}
	gets := origin.BlobGETs()
	for _, d := range allBlobs(img) {
		if gets[d] != 1 {
			t.Errorf("origin GETs of %s = %d, want exactly 1", d, gets[d])
		}
	}
	t.Logf("coalesced blob requests: %v, misses: %v",
		cove.Metric(t, "cove_requests_total", `result="coalesced"`),
		cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="miss"`))
}

// containerd's concurrent_layer_fetch_buffer fetches one blob as several concurrent
// Range requests: all are served from the one fill.
func TestConcurrentLayerFetchBuffer(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/ranged:v1", 2, 8<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	for i := range 2 { // cold, then warm
		node := peers.StartContainerd(t, peers.WithMirror(cove.URL), peers.WithConcurrentLayerFetchBuffer(1<<20))
		if err := node.Pull(ctx, img.Ref); err != nil {
			t.Fatalf("pull %d: %v", i, err)
		}
		peers.CheckPulled(t, ctx, node, img)
	}
	gets := origin.BlobGETs()
	for _, d := range allBlobs(img) {
		if gets[d] != 1 {
			t.Errorf("origin GETs of %s = %d, want 1", d, gets[d])
		}
	}
	// Each 8 MiB layer is asked for as about nine 1 MiB ranges per pull.
	blobRequests := cove.Metric(t, "cove_requests_total", `operation="blob"`)
	if blobRequests < 2*2*8 {
		t.Fatalf("cove-cache saw %v blob requests; containerd did not fetch in ranges", blobRequests)
	}
}

// A tag moved at the origin: the next pull through cove-cache gets the new image.
func TestTagMovedAtOrigin(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	old := peers.PushRandomImage(t, origin.Addr, "team/app:stable", 1, 1<<20)
	a := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := a.Pull(ctx, old.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, a, old)
	moved := peers.PushRandomImage(t, origin.Addr, "team/app:stable", 1, 1<<20)
	b := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := b.CrictlPull(ctx, moved.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, b, moved)
}

// throttle serves the origin through a slow link, so a fill is still running when the
// test kills cove-cache.
func throttle(t *testing.T, originURL string, bytesPerSec int) string {
	u, err := url.Parse(originURL)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(resp *http.Response) error {
		resp.Body = &slowBody{ReadCloser: resp.Body, perChunk: time.Duration(float64(time.Second) * float64(64<<10) / float64(bytesPerSec))}
		return nil
	}
	rp.ErrorLog = nil
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

type slowBody struct {
	io.ReadCloser
	perChunk time.Duration
}

func (s *slowBody) Read(p []byte) (int, error) {
	if len(p) > 64<<10 {
		p = p[:64<<10]
	}
	time.Sleep(s.perChunk)
	n, err := io.ReadFull(s.ReadCloser, p)
	if err == io.ErrUnexpectedEOF {
		err = io.EOF // a short last chunk is the end of the body, not a break
	}
	return n, err
}

func fileDigest(path string) (digest.Digest, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return digest.Digest("sha256:" + hex.EncodeToString(h.Sum(nil))), nil
}

// kill -9 during a fill, at several moments: after a restart the blob is either absent
// or complete and correct, leftovers are gone, and the next request serves it right.
func TestKillDuringFill(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 24<<20)
	layer := digest.Digest(img.Layers[0])
	slow := throttle(t, origin.URL, 12<<20) // ~2 s for the layer
	storage := t.TempDir()
	cove := peers.StartCove(t, storage, "--origin-plain-http", slow)
	blobFile := filepath.Join(storage, "blobs", "sha256", layer.Encoded())

	for _, killAfter := range []int64{0, 1 << 20, 12 << 20, img.Size} {
		t.Run(fmt.Sprintf("after-%d-bytes", killAfter), func(t *testing.T) {
			// Each round starts cold: let the previous round's fill commit, then drop it.
			deadline := time.Now().Add(30 * time.Second)
			for cove.Metric(t, "cove_fills_in_flight") > 0 && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			os.Remove(blobFile)
			start := time.Now()
			defer func() { t.Logf("round took %s", time.Since(start)) }()
			u := cove.URL + "/v2/team/app/blobs/" + layer.String() + "?ns=" + url.QueryEscape(slow)
			resp, err := http.Get(u)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != 200 {
				t.Fatalf("status %d", resp.StatusCode)
			}
			n, _ := io.CopyN(io.Discard, resp.Body, killAfter)
			cove.Kill9()
			resp.Body.Close()
			t.Logf("client had %d bytes when cove-cache was killed", n)

			if got, err := fileDigest(blobFile); err == nil && got != layer {
				t.Fatalf("after kill -9 the store holds a wrong blob: %s", got)
			}
			cove.Restart(t)
			for _, dir := range []string{"spool", "tmp"} {
				entries, _ := os.ReadDir(filepath.Join(storage, dir))
				if len(entries) != 0 {
					t.Fatalf("%s/ has %d leftovers after restart", dir, len(entries))
				}
			}
			if misses := cove.Metric(t, "cove_requests_total", `result="miss"`); misses != 0 {
				t.Fatalf("fresh process already counted %v misses", misses)
			}
			u = cove.URL + "/v2/team/app/blobs/" + layer.String() + "?ns=" + url.QueryEscape(slow)
			resp, err = http.Get(u)
			if err != nil {
				t.Fatal(err)
			}
			h := sha256.New()
			_, err = io.Copy(h, resp.Body)
			resp.Body.Close()
			if err != nil || "sha256:"+hex.EncodeToString(h.Sum(nil)) != layer.String() {
				t.Fatalf("after restart: %v, wrong content", err)
			}
			if misses := cove.Metric(t, "cove_requests_total", `result="miss"`); misses != 1 {
				t.Fatalf("after restart the blob was not fetched again (misses %v)", misses)
			}
		})
	}
}

// containerd answers cove-cache's relayed 401 with the user's credentials, which
// cove-cache passes to the origin; no credential reaches cove-cache's logs.
func TestAuthenticatedPull(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t, peers.WithHtpasswd("alice", "alice-secret-1"))
	img := peers.PushRandomImage(t, origin.Addr, "team/private:v1", 2, 1<<20, peers.WithPushAuth("alice", "alice-secret-1"))
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr, "--log-level", "debug")

	anon := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := anon.Pull(ctx, img.Ref); err == nil {
		t.Fatal("anonymous pull of a private image succeeded")
	}
	for i := range 2 { // cold, then from the cache
		node := peers.StartContainerd(t, peers.WithMirror(cove.URL))
		if err := node.Pull(ctx, img.Ref, "--user", "alice:alice-secret-1"); err != nil {
			t.Fatalf("pull %d: %v", i, err)
		}
		peers.CheckPulled(t, ctx, node, img)
	}
	if hits := cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="hit"`); hits < 3 {
		t.Fatalf("second authenticated pull was not served from the cache (hits %v)", hits)
	}
	if denied := cove.Metric(t, "cove_requests_total", `result="denied"`); denied == 0 {
		t.Fatal("no request was denied: the anonymous pull never reached cove-cache")
	}
	cove.Stop()
	logs, err := os.ReadFile(cove.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{"alice-secret-1", "YWxpY2U6YWxpY2Utc2VjcmV0LTE"} {
		if strings.Contains(string(logs), secret) {
			t.Fatalf("a credential (%s...) appears in cove-cache's logs", secret[:6])
		}
	}
}
