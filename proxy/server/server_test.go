package server_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/server"
	"github.com/cove-oci/cove/proxy/storage/filesystem"
)

type cache struct {
	srv   *server.Server
	http  *httptest.Server
	store *filesystem.Driver
}

func newCache(t *testing.T, plainHTTP ...string) *cache {
	return newCacheWith(t, func(*server.Config) {}, plainHTTP...)
}

func newCacheWith(t *testing.T, configure func(*server.Config), plainHTTP ...string) *cache {
	t.Helper()
	dir := t.TempDir()
	store, err := filesystem.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg := server.Config{
		Storage:      store,
		SpoolDir:     filepath.Join(dir, "spool"),
		PlainHTTP:    plainHTTP,
		StallTimeout: 5 * time.Second,
	}
	configure(&cfg)
	srv, err := server.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	// Fills and pushed objects are stored in the background, after their clients are
	// answered: let them end before the storage directory is removed.
	t.Cleanup(func() {
		for deadline := time.Now().Add(10 * time.Second); srv.Fills().InFlight() > 0 || srv.PendingStores() > 0; {
			if time.Now().After(deadline) {
				t.Log("fills or stores still running at the end of the test")
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	})
	return &cache{srv: srv, http: hs, store: store}
}

// url builds a cache URL for origin's repository path, routed by ns= as containerd does.
func (c *cache) url(origin, path string) string {
	return c.http.URL + path + "?ns=" + url.QueryEscape(origin)
}

func (c *cache) settle(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for c.srv.Fills().InFlight() > 0 || c.srv.PendingStores() > 0 {
		if time.Now().After(deadline) {
			t.Fatal("fills did not settle")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func do(t *testing.T, method, u string, hdr map[string]string) (*http.Response, []byte, error) {
	t.Helper()
	req, err := http.NewRequest(method, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

func mustGet(t *testing.T, u string, hdr map[string]string, want int) (*http.Response, []byte) {
	t.Helper()
	resp, body, err := do(t, http.MethodGet, u, hdr)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	if resp.StatusCode != want {
		t.Fatalf("GET %s: status %d, want %d: %s", u, resp.StatusCode, want, body)
	}
	return resp, body
}

const acceptManifests = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json"

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

func TestPullByNamespaceAndPathPrefix(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 2, 1<<20)
	c := newCache(t, origin.Addr)
	accept := map[string]string{"Accept": acceptManifests}

	for _, prefix := range []string{"", "/" + origin.Addr} {
		base := c.http.URL + "/v2" + prefix + "/team/app"
		q := ""
		if prefix == "" {
			q = "?ns=" + url.QueryEscape(origin.Addr)
		}
		resp, body := mustGet(t, base+"/manifests/v1"+q, accept, 200)
		if got := resp.Header.Get("Docker-Content-Digest"); got != img.Digest || sha(body) != img.Digest {
			t.Fatalf("manifest digest = %s (body %s), want %s", got, sha(body), img.Digest)
		}
		if prefix == "" && resp.Header.Get("Oci-Namespace") != origin.Addr {
			t.Fatalf("OCI-Namespace = %q", resp.Header.Get("Oci-Namespace"))
		}
		for _, d := range append([]string{img.Config}, img.Layers...) {
			resp, body := mustGet(t, base+"/blobs/"+d+q, nil, 200)
			if sha(body) != d || resp.Header.Get("Docker-Content-Digest") != d {
				t.Fatalf("blob %s: got %s", d, sha(body))
			}
		}
		c.settle(t)
	}
	for _, d := range append([]string{img.Config}, img.Layers...) {
		if n := origin.BlobGETs()[d]; n != 1 {
			t.Errorf("origin served %s %d times, want 1", d, n)
		}
	}
	// HEAD by digest and by tag.
	resp, _, err := do(t, http.MethodHead, c.url(origin.Addr, "/v2/team/app/blobs/"+img.Layers[0]), nil)
	if err != nil || resp.StatusCode != 200 || resp.ContentLength != 1<<20 && resp.ContentLength <= 0 {
		t.Fatalf("HEAD blob: %v %v", resp, err)
	}
	resp, _, err = do(t, http.MethodHead, c.url(origin.Addr, "/v2/team/app/manifests/v1"), accept)
	if err != nil || resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != img.Digest {
		t.Fatalf("HEAD manifest: %v %v", resp, err)
	}
}

func TestRanges(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 3<<20)
	c := newCache(t, origin.Addr)
	layer := c.url(origin.Addr, "/v2/team/app/blobs/"+img.Layers[0])

	// Cold: a range request starts the fill and gets its slice while the fill runs.
	resp, part := mustGet(t, layer, map[string]string{"Range": "bytes=1000-1999"}, 206)
	if len(part) != 1000 || !strings.HasPrefix(resp.Header.Get("Content-Range"), "bytes 1000-1999/") {
		t.Fatalf("cold range: %d bytes, Content-Range %q", len(part), resp.Header.Get("Content-Range"))
	}
	c.settle(t)
	_, whole := mustGet(t, layer, nil, 200)
	if sha(whole) != img.Layers[0] || !bytes.Equal(whole[1000:2000], part) {
		t.Fatal("cold range differs from the blob")
	}
	// Warm: resume from an offset, suffix, and errors.
	_, tail := mustGet(t, layer, map[string]string{"Range": fmt.Sprintf("bytes=%d-", len(whole)-5000)}, 206)
	if !bytes.Equal(tail, whole[len(whole)-5000:]) {
		t.Fatal("resumed range differs")
	}
	_, suffix := mustGet(t, layer, map[string]string{"Range": "bytes=-10"}, 206)
	if !bytes.Equal(suffix, whole[len(whole)-10:]) {
		t.Fatal("suffix range differs")
	}
	resp, _ = mustGet(t, layer, map[string]string{"Range": fmt.Sprintf("bytes=%d-", len(whole))}, 416)
	if resp.Header.Get("Content-Range") != fmt.Sprintf("bytes */%d", len(whole)) {
		t.Fatalf("416 Content-Range = %q", resp.Header.Get("Content-Range"))
	}
	mustGet(t, layer, map[string]string{"Range": "bytes=oops"}, 400)
	mustGet(t, layer, map[string]string{"Range": "bytes=0-1,5-6"}, 200) // several ranges: whole body
}

// Many clients, one origin GET per blob, every client streamed the right bytes, some with
// ranges as containerd's concurrent_layer_fetch_buffer asks.
func TestConcurrentClientsOneOriginFetch(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 8<<20)
	c := newCache(t, origin.Addr)
	layer := c.url(origin.Addr, "/v2/team/app/blobs/"+img.Layers[0])
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			hdr := map[string]string{}
			if i%2 == 1 {
				hdr["Range"] = fmt.Sprintf("bytes=%d-", i*(256<<10))
			}
			resp, body, err := do(t, http.MethodGet, layer, hdr)
			if err != nil {
				errs <- err
				return
			}
			if i%2 == 0 && sha(body) != img.Layers[0] {
				errs <- fmt.Errorf("client %d: wrong body (status %d)", i, resp.StatusCode)
			}
			if i%2 == 1 && (resp.StatusCode != 206 || int64(len(body)) != img.Size-int64(i*(256<<10))) {
				errs <- fmt.Errorf("client %d: status %d, %d bytes", i, resp.StatusCode, len(body))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	c.settle(t)
	if n := origin.BlobGETs()[img.Layers[0]]; n != 1 {
		t.Fatalf("origin GETs for the blob = %d, want 1", n)
	}
}

func TestTagMovedAtOrigin(t *testing.T) {
	origin := peers.StartRegistry(t)
	c := newCache(t, origin.Addr)
	accept := map[string]string{"Accept": acceptManifests}
	first := peers.PushRandomImage(t, origin.Addr, "team/app:stable", 1, 1024)
	resp, _ := mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/stable"), accept, 200)
	if resp.Header.Get("Docker-Content-Digest") != first.Digest {
		t.Fatal("first digest")
	}
	second := peers.PushRandomImage(t, origin.Addr, "team/app:stable", 1, 1024)
	resp, body := mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/stable"), accept, 200)
	if resp.Header.Get("Docker-Content-Digest") != second.Digest || sha(body) != second.Digest {
		t.Fatalf("after the tag moved: %s, want %s", resp.Header.Get("Docker-Content-Digest"), second.Digest)
	}
}

// Cached content is served only after the origin confirms the client; with the origin
// gone, nothing is served (the client falls back).
func TestCachedContentNeedsTheOrigin(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 4096)
	const ttl = 300 * time.Millisecond
	c := newCacheWith(t, func(cfg *server.Config) { cfg.AuthzTTL = ttl }, origin.Addr)
	layer := c.url(origin.Addr, "/v2/team/app/blobs/"+img.Layers[0])
	mustGet(t, layer, nil, 200)
	c.settle(t)
	// Another repository at the same origin does not hold this blob: the origin says 404.
	other := c.url(origin.Addr, "/v2/team/other/blobs/"+img.Layers[0])
	if resp, body, _ := do(t, http.MethodGet, other, nil); resp.StatusCode != 404 || sha(body) == img.Layers[0] {
		t.Fatalf("blob served through a repository that does not hold it: %d", resp.StatusCode)
	}
	origin.Stop()
	time.Sleep(ttl + 100*time.Millisecond) // past the authorization TTL
	resp, body, _ := do(t, http.MethodGet, layer, nil)
	if resp.StatusCode < 500 || sha(body) == img.Layers[0] {
		t.Fatalf("cached blob served with the origin down: %d", resp.StatusCode)
	}
}

// A registry that says yes to every HEAD unlocks nothing fetched from another registry.
func TestProvenance(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 4096)
	var liarGETs atomic.Int32
	liar := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			liarGETs.Add(1)
		}
		w.Header().Set("Content-Length", "4096")
		w.WriteHeader(200)
		if r.Method == http.MethodGet {
			w.Write(make([]byte, 4096))
		}
	}))
	defer liar.Close()
	liarAddr := strings.TrimPrefix(liar.URL, "http://")
	c := newCache(t, origin.Addr, liarAddr)
	mustGet(t, c.url(origin.Addr, "/v2/team/app/blobs/"+img.Layers[0]), nil, 200)
	c.settle(t)

	resp, body, err := do(t, http.MethodGet, c.url(liarAddr, "/v2/team/app/blobs/"+img.Layers[0]), nil)
	if err == nil && sha(body) == img.Layers[0] {
		t.Fatalf("cached blob served for a registry it was not fetched from (status %d)", resp.StatusCode)
	}
	if liarGETs.Load() != 1 {
		t.Fatalf("the liar was asked %d times; the request should have been a miss for that registry", liarGETs.Load())
	}
	c.settle(t)
	// The liar's zeros did not match the digest: nothing new was stored or recorded.
	if _, err := c.store.GetRecord(context.Background(), "provenance/sha256/"+digest.Digest(img.Layers[0]).Encoded()+"/"+liarAddr); !errdefs.IsNotFound(err) {
		t.Fatalf("provenance recorded for the liar: %v", err)
	}
}

// An origin that sends wrong or truncated bytes: the client gets an error, nothing is
// stored, the next request fetches again.
func TestCorruptOrigin(t *testing.T) {
	good := bytes.Repeat([]byte("cove"), 256<<10)
	d := digest.FromBytes(good)
	for name, mangle := range map[string]func([]byte) []byte{
		"wrong bytes": func(b []byte) []byte { b = bytes.Clone(b); b[len(b)/2] ^= 1; return b },
		"truncated":   func(b []byte) []byte { return b[:len(b)-1000] },
	} {
		t.Run(name, func(t *testing.T) {
			var gets atomic.Int32
			bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Method != http.MethodGet {
					w.WriteHeader(200)
					return
				}
				if r.Header.Get("Range") == "" {
					gets.Add(1) // a fill's first request; a truncated body is resumed with Range ones
				}
				w.Header().Set("Content-Length", fmt.Sprint(len(good)))
				w.WriteHeader(200)
				w.Write(mangle(good))
			}))
			defer bad.Close()
			addr := strings.TrimPrefix(bad.URL, "http://")
			c := newCache(t, addr)
			u := c.url(addr, "/v2/team/app/blobs/"+d.String())
			for i := 1; i <= 2; i++ {
				_, body, err := do(t, http.MethodGet, u, nil)
				if err == nil && bytes.Equal(body, good) {
					t.Fatal("corrupt origin body served whole")
				}
				if err == nil {
					t.Fatalf("client saw a clean end of a broken body (%d bytes)", len(body))
				}
				c.settle(t)
				if _, err := c.store.Stat(context.Background(), d); !errdefs.IsNotFound(err) {
					t.Fatalf("corrupt blob stored: %v", err)
				}
				if gets.Load() != int32(i) {
					t.Fatalf("origin GETs = %d after %d requests", gets.Load(), i)
				}
			}
		})
	}
}

// Whatever the client's Accept-Encoding, the origin is asked for identity bytes, so a
// manifest's digest holds.
func TestAcceptEncodingNotForwarded(t *testing.T) {
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}`)
	d := digest.FromBytes(manifest)
	var sawEncoding atomic.Value
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sawEncoding.Store(r.Header.Get("Accept-Encoding"))
		w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
		w.Header().Set("Docker-Content-Digest", d.String())
		if strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
			w.Header().Set("Content-Encoding", "gzip")
			gz := gzip.NewWriter(w)
			gz.Write(manifest)
			gz.Close()
			return
		}
		w.Write(manifest)
	}))
	defer origin.Close()
	addr := strings.TrimPrefix(origin.URL, "http://")
	c := newCache(t, addr)
	resp, body := mustGet(t, c.url(addr, "/v2/team/app/manifests/"+d.String()),
		map[string]string{"Accept-Encoding": "zstd;q=1.0, gzip;q=0.8, deflate;q=0.5", "Accept": acceptManifests}, 200)
	if !bytes.Equal(body, manifest) || resp.Header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("manifest body differs: %q", body)
	}
	if got := sawEncoding.Load(); got != "identity" {
		t.Fatalf("origin saw Accept-Encoding %q, want identity", got)
	}
}

// Malformed requests get a clear 4xx in the distribution error format and never reach
// the origin.
func TestInvalidRequests(t *testing.T) {
	origin := peers.StartRegistry(t)
	c := newCache(t, origin.Addr)
	ns := "?ns=" + url.QueryEscape(origin.Addr)
	before := len(origin.Requests()) // the readiness probe
	for _, tc := range []struct {
		method, path string
		status       int
		code         string
	}{
		{"GET", "/v2/Team/app/manifests/v1" + ns, 400, "NAME_INVALID"},
		{"GET", "/v2/team/app/manifests/v1?ns=evil.example%2Fx", 400, "NAME_INVALID"},
		{"GET", "/v2/team/app/blobs/sha256:1234" + ns, 400, "DIGEST_INVALID"},
		{"GET", "/v2/team/app/manifests/.bad" + ns, 404, "MANIFEST_UNKNOWN"},
		{"GET", "/v2/team/app/whatever/x" + ns, 404, "UNSUPPORTED"},
		{"PUT", "/v2/Team/app/manifests/v1" + ns, 400, "NAME_INVALID"},
		{"POST", "/v2/team/app/blobs/uploads/x" + ns, 405, "UNSUPPORTED"},
		{"PATCH", "/v2/team/app/blobs/uploads/" + ns, 405, "UNSUPPORTED"},
		{"PATCH", "/v2/team/app/blobs/uploads/not.a.handle" + ns, 404, "BLOB_UPLOAD_UNKNOWN"},
		{"PUT", "/v2/team/app/blobs/uploads/unknownhandle" + ns, 404, "BLOB_UPLOAD_UNKNOWN"},
		{"HEAD", "/v2/team/app/blobs/uploads/unknownhandle" + ns, 405, ""},
		{"DELETE", "/v2/team/app/tags/list" + ns, 405, "UNSUPPORTED"},
		{"DELETE", "/v2/team/app/blobs/sha256:1234" + ns, 400, "DIGEST_INVALID"},
		{"DELETE", "/v2/team/app/manifests/.bad" + ns, 404, "MANIFEST_UNKNOWN"},
		{"POST", "/v2/team/app/manifests/v1" + ns, 405, "UNSUPPORTED"},
	} {
		resp, body, err := do(t, tc.method, c.http.URL+tc.path, nil)
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			Errors []struct{ Code string } `json:"errors"`
		}
		if tc.method == http.MethodHead && resp.StatusCode == tc.status {
			continue // no body to check
		}
		if resp.StatusCode != tc.status || json.Unmarshal(body, &doc) != nil || len(doc.Errors) != 1 || doc.Errors[0].Code != tc.code {
			t.Errorf("%s %s = %d %s; want %d %s", tc.method, tc.path, resp.StatusCode, body, tc.status, tc.code)
		}
	}
	if n := len(origin.Requests()) - before; n != 0 {
		t.Fatalf("malformed requests reached the origin %d times", n)
	}
}

// Credentials go to the origin; its 401 and challenge come back unchanged; and a cached
// object is served only to a client the origin accepts.
func TestCredentialsPassThrough(t *testing.T) {
	origin := peers.StartRegistry(t, peers.WithHtpasswd("alice", "alice-secret"))
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 64<<10, peers.WithPushAuth("alice", "alice-secret"))
	c := newCache(t, origin.Addr)
	alice := "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:alice-secret"))
	mallory := "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:guess"))
	manifest := c.url(origin.Addr, "/v2/team/app/manifests/v1")
	layer := c.url(origin.Addr, "/v2/team/app/blobs/"+img.Layers[0])

	originResp, _, err := do(t, http.MethodGet, origin.URL+"/v2/team/app/manifests/v1", nil)
	if err != nil {
		t.Fatal(err)
	}
	check401 := func(u string, hdr map[string]string) {
		t.Helper()
		resp, body, err := do(t, http.MethodGet, u, hdr)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 401 {
			t.Fatalf("GET %s: %d, want 401", u, resp.StatusCode)
		}
		if got, want := resp.Header.Get("Www-Authenticate"), originResp.Header.Get("Www-Authenticate"); got != want || got == "" {
			t.Fatalf("challenge = %q, want the origin's %q", got, want)
		}
		if sha(body) == img.Layers[0] {
			t.Fatal("blob bytes in a 401")
		}
	}
	// Cold, without or with wrong credentials: the origin's 401 comes back; nothing stored.
	check401(manifest, map[string]string{"Accept": acceptManifests})
	check401(layer, nil)
	check401(layer, map[string]string{"Authorization": mallory})
	c.settle(t)
	if _, err := c.store.Stat(context.Background(), digest.Digest(img.Layers[0])); !errdefs.IsNotFound(err) {
		t.Fatal("blob stored from a refused fill")
	}
	// With credentials: served and cached.
	mustGet(t, manifest, map[string]string{"Accept": acceptManifests, "Authorization": alice}, 200)
	_, body := mustGet(t, layer, map[string]string{"Authorization": alice}, 200)
	if sha(body) != img.Layers[0] {
		t.Fatal("wrong blob")
	}
	c.settle(t)
	// Cached now, and still refused to anyone the origin refuses.
	check401(layer, nil)
	check401(layer, map[string]string{"Authorization": mallory})
	check401(c.url(origin.Addr, "/v2/team/app/manifests/"+img.Digest), map[string]string{"Accept": acceptManifests})
	_, body = mustGet(t, layer, map[string]string{"Authorization": alice}, 200)
	if sha(body) != img.Layers[0] {
		t.Fatal("wrong cached blob")
	}
}
