package prefill_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/plugin/mirror"
	"github.com/cove-oci/cove/plugin/prefill"
	"github.com/cove-oci/cove/proxy/fill"
)

// relay makes the mirror fetch from the origin itself, so a test client gets the blob
// from the mirror whatever happened to cove-cache.
func relay(_ *prefill.Config, m *mirror.Config) { m.Fallback = mirror.FallbackRelay }

// client bounds every test request: a wedged prefill shows as an error, not a hang.
var client = &http.Client{Timeout: 20 * time.Second}

func (r *rig) get(t *testing.T, path string) (string, error) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, r.url(path), nil)
	req.Header.Set("Accept", accept)
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	h := sha256.New()
	if _, err := io.Copy(h, resp.Body); err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", &statusError{resp.StatusCode}
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), nil
}

type statusError struct{ code int }

func (e *statusError) Error() string { return http.StatusText(e.code) }

func (r *rig) count(k string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.served[k]
}

// awaitCount waits up to 5 s for count(k) to reach want, and returns what it is then.
// The mirror reports where it served a request from after the body's last byte, so a
// client can have its whole answer a moment before the report.
func (r *rig) awaitCount(k string, want int) int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := r.count(k)
		if n >= want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// servedSoFar is a copy of what was served from where, for a failure message.
func (r *rig) servedSoFar() map[string]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.served)
}

func blobsOf(img peers.Image) []string { return append([]string{img.Config}, img.Layers...) }

// A cove-cache that hangs once it has served the manifest (it accepts the prefill's
// blob requests and never answers, /healthz neither): the prefill gives up as soon as
// the resolver hook would (a failed health probe), the manifest's body is not held
// until MaxHold, and every blob then comes from the origin.
func TestPrefillLetsGoOfHungCache(t *testing.T) {
	var fc *peers.FailingCache
	r := newRigWith(t, 1<<20, func(u string) string {
		fc = peers.StartFailingCache(t, u, peers.HangAfterManifest, 0)
		return fc.URL
	}, relay)
	start := time.Now()
	if got, err := r.get(t, "/v2/team/app/manifests/"+r.img.Digest); err != nil || got != r.img.Digest {
		t.Fatalf("manifest: %s, %v", got, err)
	}
	held := time.Since(start)
	if !fc.Tripped() {
		t.Fatal("the cache never failed")
	}
	// The bound only tells a prefill that gave up from one that waited for MaxHold (20 s).
	if held > 10*time.Second {
		t.Fatalf("manifest body held %s by a prefill from a hung cache", held)
	}
	for _, d := range blobsOf(r.img) {
		if got, err := r.get(t, "/v2/team/app/blobs/"+d); err != nil || got != d {
			t.Fatalf("blob %s: %s, %v", d, got, err)
		}
	}
	if n := r.awaitCount("origin/breaker-open", len(blobsOf(r.img))); n != len(blobsOf(r.img)) {
		t.Fatalf("served %v; want every blob from the origin, the breaker open", r.servedSoFar())
	}
	waitIdle(t, r.prefill.Fills())
	t.Logf("manifest body after %s", held.Round(time.Millisecond))
}

// A cove-cache that stalls mid-blob while containerd's GET of that blob has joined its
// prefill: the prefill's fetch is given up when the cache fails its health probe, and
// the joined GET is finished from the origin with a Range request, as the resolver hook
// finishes a body cove-cache broke off. cove-cache saw one request for the blob.
func TestJoinedPrefillOfStallingCacheResumes(t *testing.T) {
	var fc *peers.FailingCache
	r := newRigWith(t, 2<<20, func(u string) string {
		fc = peers.StartFailingCache(t, u, peers.StallAfterManifest, 512<<10)
		return fc.URL
	}, relay)
	manifest := make(chan error, 1)
	go func() {
		_, err := r.get(t, "/v2/team/app/manifests/"+r.img.Digest)
		manifest <- err
	}()
	layer := streamingLayer(t, r.prefill.Fills(), r.img.Layers)
	if got, err := r.get(t, "/v2/team/app/blobs/"+layer); err != nil || got != layer {
		t.Fatalf("joined blob: %s, %v", got, err)
	}
	if err := <-manifest; err != nil {
		t.Fatal(err)
	}
	if r.awaitCount("origin/stall", 1) != 1 {
		t.Fatalf("served %v; want the joined blob finished from the origin", r.servedSoFar())
	}
	if n := fc.BlobGETs()[layer]; n != 1 {
		t.Fatalf("cove-cache saw %d GETs of the joined blob, want 1 (the prefill's)", n)
	}
	waitIdle(t, r.prefill.Fills())
}

// joinWhenRunning waits until the prefill of d runs.
func joinWhenRunning(t *testing.T, m *fill.Manager, d string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if f := m.Lookup(fill.Key{Registry: "local", Digest: digest.Digest(d)}); f != nil {
			f.Release()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the prefill of %s never started", d)
		}
		time.Sleep(time.Millisecond)
	}
}

// streamingLayer waits until the prefill of one of layers has cove-cache's answer (its
// size is known) and returns it, so that a GET joining it meets a stall mid-body, not a
// wait for headers. Which one: the first body to stall freezes the cache, and a layer
// whose request reached it after that never gets headers (under load, any of them).
func streamingLayer(t *testing.T, m *fill.Manager, layers []string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, d := range layers {
			f := m.Lookup(fill.Key{Registry: "local", Digest: digest.Digest(d)})
			if f == nil {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
			_, err := f.WaitSize(ctx)
			cancel()
			f.Release()
			if err == nil {
				return d
			}
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatal("no prefill of a layer got an answer from cove-cache")
	return ""
}

func waitIdle(t *testing.T, m *fill.Manager) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for m.InFlight() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d prefills still running", m.InFlight())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A prefill holds its fetch slot until its body is done, not just until its headers:
// with one slot and a healthy cache sending the first blob slowly, no other blob is
// requested meanwhile. A queued blob that containerd asks for goes at once, without a
// slot, and is served from that one fetch.
func TestPrefillSlotLastsTheBody(t *testing.T) {
	gate, stalled := make(chan struct{}), make(chan struct{})
	var mu sync.Mutex
	var order []string
	r := newRigWith(t, 1<<20, func(u string) string {
		return gatedCache(t, u, gate, stalled, &mu, &order)
	}, func(p *prefill.Config, m *mirror.Config) {
		p.Parallel = 1
		m.Fallback = mirror.FallbackRelay
	})
	requested := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), order...)
	}
	manifest := make(chan error, 1)
	go func() {
		_, err := r.get(t, "/v2/team/app/manifests/"+r.img.Digest)
		manifest <- err
	}()
	select {
	case <-stalled:
	case <-time.After(10 * time.Second):
		t.Fatal("no layer's prefill reached the cache")
	}
	// A layer's body is held at the gate; with the slot taken, nothing else may go.
	before := requested()
	time.Sleep(time.Second)
	if got := requested(); len(got) != len(before) {
		t.Fatalf("cove-cache saw blob GETs %v while the body of %s was unfinished, want none (one slot)", got[len(before):], before[len(before)-1])
	}
	var queued string
	for _, d := range blobsOf(r.img) {
		if !strings.Contains(strings.Join(before, " "), d) {
			queued = d
			break
		}
	}
	if got, err := r.get(t, "/v2/team/app/blobs/"+queued); err != nil || got != queued {
		t.Fatalf("queued blob asked for: %s, %v", got, err)
	}
	if r.awaitCount("prefill", 1) != 1 {
		t.Fatalf("served %v; want the asked-for blob served from its prefill", r.servedSoFar())
	}
	close(gate)
	if err := <-manifest; err != nil {
		t.Fatal(err)
	}
	for _, d := range requested() {
		if n := strings.Count(strings.Join(requested(), " "), d); n != 1 {
			t.Fatalf("cove-cache saw %d GETs of %s, want 1", n, d)
		}
	}
	waitIdle(t, r.prefill.Fills())
}

// gatedCache relays cove-cache, recording blob GETs in order; the first blob body
// longer than 64 KiB it relays stops after 64 KiB (closing stalled) until gate closes. Its /healthz stays healthy: a cache
// behind a slow origin, not a dead one.
func gatedCache(t *testing.T, cacheURL string, gate, stalled chan struct{}, mu *sync.Mutex, order *[]string) string {
	u, _ := url.Parse(cacheURL)
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1
	first := true
	rp.ModifyResponse = func(resp *http.Response) error {
		if !strings.Contains(resp.Request.URL.Path, "/blobs/") || resp.StatusCode != http.StatusOK {
			return nil
		}
		mu.Lock()
		defer mu.Unlock()
		*order = append(*order, resp.Request.URL.Path[strings.LastIndex(resp.Request.URL.Path, "/")+1:])
		if first && resp.ContentLength > 64<<10 {
			first = false
			resp.Body = &gatedBody{ReadCloser: resp.Body, left: 64 << 10, gate: gate, stalled: stalled, done: resp.Request.Context().Done()}
		}
		return nil
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	return srv.URL
}

type gatedBody struct {
	io.ReadCloser
	left          int64
	gate, stalled chan struct{}
	once          sync.Once
	done          <-chan struct{}
}

func (g *gatedBody) Read(p []byte) (int, error) {
	if g.left <= 0 {
		g.once.Do(func() { close(g.stalled) })
		select {
		case <-g.gate:
		case <-g.done:
			return 0, io.ErrUnexpectedEOF
		}
		return g.ReadCloser.Read(p)
	}
	if int64(len(p)) > g.left {
		p = p[:g.left]
	}
	n, err := g.ReadCloser.Read(p)
	g.left -= int64(n)
	return n, err
}
