package server_test

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/evict"
	"github.com/cove-oci/cove/proxy/server"
	"github.com/cove-oci/cove/proxy/storage/filesystem"
)

// send makes one request with a body and headers, and returns the response with its body.
func send(t *testing.T, method, u string, body []byte, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, u, rd)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

// expect fails t unless resp has status want.
func expect(t *testing.T, what string, resp *http.Response, body []byte, want int) {
	t.Helper()
	if resp.StatusCode != want {
		t.Fatalf("%s: status %d, want %d: %s", what, resp.StatusCode, want, body)
	}
}

// resolve turns a Location the cache answered into an absolute URL of the cache, and
// checks that it names the cache only: never the origin's host or its upload state.
func resolve(t *testing.T, c *cache, originAddr, loc string) string {
	t.Helper()
	if loc == "" || strings.Contains(loc, originAddr) || strings.Contains(loc, "_state") {
		t.Fatalf("Location %q: want cove-cache's own URL", loc)
	}
	base, _ := url.Parse(c.http.URL + "/")
	u, err := base.Parse(loc)
	if err != nil || u.Host != base.Host {
		t.Fatalf("Location %q does not resolve to the cache", loc)
	}
	return u.String()
}

func withQuery(u string, kv ...string) string {
	sep := "?"
	if strings.Contains(u, "?") {
		sep = "&"
	}
	for i := 0; i+1 < len(kv); i += 2 {
		u += sep + kv[i] + "=" + url.QueryEscape(kv[i+1])
		sep = "&"
	}
	return u
}

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := crand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// A blob pushed in three chunks through the cache (POST, PATCH, status GET, PATCH,
// PUT with the last chunk): the origin holds it, the cache kept it, and a pull through
// the cache costs the origin no blob GET. Then a cross-repository mount through the
// cache, learned from the origin's 201: the blob is served in the second repository
// without an origin GET either. A wrong digest stores nothing.
func TestPushChunkedAndMount(t *testing.T) {
	reg := peers.StartRegistry(t)
	c := newCache(t, reg.Addr)
	blob := randomBytes(t, 3<<20+123)
	d := digest.FromBytes(blob)
	parts := [][]byte{blob[:1<<20], blob[1<<20 : 2<<20], blob[2<<20:]}

	resp, body := send(t, http.MethodPost, c.url(reg.Addr, "/v2/team/app/blobs/uploads/"), nil, nil)
	expect(t, "POST", resp, body, http.StatusAccepted)
	loc := resolve(t, c, reg.Addr, resp.Header.Get("Location"))
	if resp.Header.Get("Docker-Upload-Uuid") == "" {
		t.Fatal("no Docker-Upload-UUID relayed")
	}
	off := 0
	for i, p := range parts[:2] {
		resp, body = send(t, http.MethodPatch, loc, p, map[string]string{
			"Content-Type":  "application/octet-stream",
			"Content-Range": strconv.Itoa(off) + "-" + strconv.Itoa(off+len(p)-1),
		})
		expect(t, "PATCH "+strconv.Itoa(i), resp, body, http.StatusAccepted)
		off += len(p)
		if got, want := resp.Header.Get("Range"), "0-"+strconv.Itoa(off-1); got != want {
			t.Fatalf("PATCH %d: Range %q, want %q", i, got, want)
		}
		loc = resolve(t, c, reg.Addr, resp.Header.Get("Location"))
		resp, body = send(t, http.MethodGet, loc, nil, nil)
		expect(t, "status GET", resp, body, http.StatusNoContent)
		if got, want := resp.Header.Get("Range"), "0-"+strconv.Itoa(off-1); got != want {
			t.Fatalf("status: Range %q, want %q", got, want)
		}
	}
	resp, body = send(t, http.MethodPut, withQuery(loc, "digest", d.String()), parts[2], map[string]string{"Content-Type": "application/octet-stream"})
	expect(t, "PUT", resp, body, http.StatusCreated)
	if resp.Header.Get("Docker-Content-Digest") != d.String() {
		t.Fatalf("Docker-Content-Digest %q", resp.Header.Get("Docker-Content-Digest"))
	}
	if !strings.HasSuffix(resolve(t, c, reg.Addr, resp.Header.Get("Location")), "/v2/team/app/blobs/"+d.String()+"?ns="+url.QueryEscape(reg.Addr)) {
		t.Fatalf("Location %q", resp.Header.Get("Location"))
	}
	// The session is gone: its handle is unknown now.
	resp, body = send(t, http.MethodGet, loc, nil, nil)
	expect(t, "status GET after completion", resp, body, http.StatusNotFound)

	if _, direct := mustGet(t, "http://"+reg.Addr+"/v2/team/app/blobs/"+d.String(), nil, 200); !bytes.Equal(direct, blob) {
		t.Fatal("the origin does not hold the pushed bytes")
	}
	gets := reg.BlobGETs()[d.String()]
	c.settle(t) // pushed blobs are stored in the background
	if _, err := c.store.Stat(t.Context(), d); err != nil {
		t.Fatalf("the pushed blob was not kept: %v", err)
	}
	if _, got := mustGet(t, c.url(reg.Addr, "/v2/team/app/blobs/"+d.String()), nil, 200); !bytes.Equal(got, blob) {
		t.Fatal("wrong bytes through the cache")
	}
	if n := reg.BlobGETs()[d.String()]; n != gets {
		t.Fatalf("a pull through the cache fetched the pushed blob from the origin (%d GETs)", n-gets)
	}

	// Cross-repository mount through the cache.
	resp, body = send(t, http.MethodPost, withQuery(c.url(reg.Addr, "/v2/other/app/blobs/uploads/"), "mount", d.String(), "from", "team/app"), nil, nil)
	expect(t, "mount", resp, body, http.StatusCreated)
	if !strings.Contains(resolve(t, c, reg.Addr, resp.Header.Get("Location")), "/v2/other/app/blobs/"+d.String()) {
		t.Fatalf("mount Location %q", resp.Header.Get("Location"))
	}
	before := len(reg.Requests())
	if _, got := mustGet(t, c.url(reg.Addr, "/v2/other/app/blobs/"+d.String()), nil, 200); !bytes.Equal(got, blob) {
		t.Fatal("wrong bytes through the cache after the mount")
	}
	if n := len(reg.Requests()) - before; n != 0 {
		t.Fatalf("the mounted blob cost the origin %d requests; the mount's 201 is its word", n)
	}

	// A PUT whose digest does not match the bytes: the origin refuses, nothing is kept.
	// (distribution answers a POST with digest= with a session, ignoring its body, so the
	// bytes go in the PUT, as crane and containerd send them.)
	other := randomBytes(t, 4096)
	wrong := digest.FromBytes(append([]byte("x"), other...))
	resp, body = send(t, http.MethodPost, withQuery(c.url(reg.Addr, "/v2/team/app/blobs/uploads/"), "digest", wrong.String()), other, map[string]string{"Content-Type": "application/octet-stream"})
	expect(t, "POST with digest=", resp, body, http.StatusAccepted)
	loc = resolve(t, c, reg.Addr, resp.Header.Get("Location"))
	resp, body = send(t, http.MethodPut, withQuery(loc, "digest", wrong.String()), other, map[string]string{"Content-Type": "application/octet-stream"})
	if resp.StatusCode < 400 {
		t.Fatalf("a wrong digest was accepted: %d %s", resp.StatusCode, body)
	}
	c.settle(t)
	if _, err := c.store.Stat(t.Context(), wrong); err == nil {
		t.Fatal("a blob whose bytes do not match its digest was stored")
	}
	// The same bytes with their digest, in one PUT: kept.
	good := digest.FromBytes(other)
	resp, body = send(t, http.MethodPost, c.url(reg.Addr, "/v2/team/app/blobs/uploads/"), nil, nil)
	expect(t, "POST", resp, body, http.StatusAccepted)
	loc = resolve(t, c, reg.Addr, resp.Header.Get("Location"))
	resp, body = send(t, http.MethodPut, withQuery(loc, "digest", good.String()), other, map[string]string{"Content-Type": "application/octet-stream"})
	expect(t, "monolithic PUT", resp, body, http.StatusCreated)
	c.settle(t)
	if _, err := c.store.Stat(t.Context(), good); err != nil {
		t.Fatalf("a monolithic upload was not kept: %v", err)
	}
	if n := c.srv.UploadSessions(); n != 1 {
		t.Fatalf("%d upload sessions open, want 1 (the refused one, which the origin still knows)", n)
	}
}

// Upload sessions are bounded in number (a push beyond gets 429 before the origin is
// asked) and in age (an idle session ends: its handle is unknown, its spool removed).
func TestUploadSessionBounds(t *testing.T) {
	reg := peers.StartRegistry(t)
	var spoolDir string
	c := newCacheWith(t, func(cfg *server.Config) {
		cfg.UploadSessions = 2
		cfg.UploadMaxAge = 300 * time.Millisecond
		spoolDir = cfg.SpoolDir
	}, reg.Addr)
	start := c.url(reg.Addr, "/v2/team/app/blobs/uploads/")
	var locs []string
	for range 2 {
		resp, body := send(t, http.MethodPost, start, nil, nil)
		expect(t, "POST", resp, body, http.StatusAccepted)
		locs = append(locs, resolve(t, c, reg.Addr, resp.Header.Get("Location")))
	}
	resp, body := send(t, http.MethodPatch, locs[0], randomBytes(t, 1000), nil)
	expect(t, "PATCH", resp, body, http.StatusAccepted)
	if ents, _ := os.ReadDir(filepath.Join(spoolDir, "uploads")); len(ents) != 1 {
		t.Fatalf("%d spool files, want 1", len(ents))
	}
	before := len(reg.Requests())
	resp, body = send(t, http.MethodPost, start, nil, nil)
	expect(t, "a third POST", resp, body, http.StatusTooManyRequests)
	if n := len(reg.Requests()) - before; n != 0 {
		t.Fatalf("a refused POST reached the origin %d times", n)
	}
	time.Sleep(400 * time.Millisecond)
	resp, body = send(t, http.MethodPost, start, nil, nil)
	expect(t, "a POST after the sessions aged out", resp, body, http.StatusAccepted)
	for _, l := range locs {
		resp, body = send(t, http.MethodPatch, l, []byte("x"), nil)
		expect(t, "PATCH of an expired session", resp, body, http.StatusNotFound)
	}
	if ents, _ := os.ReadDir(filepath.Join(spoolDir, "uploads")); len(ents) != 0 {
		t.Fatalf("%d spool files left by expired sessions", len(ents))
	}
	if n := c.srv.UploadSessions(); n != 1 {
		t.Fatalf("%d sessions open, want 1", n)
	}
}

// A manifest PUT by digest and by tag: the origin's OCI-Subject and digest reach the
// client, Location is cove-cache's own, and the manifest accepted is served from the
// cache with the type it was pushed with. A manifest the origin refuses is not kept.
func TestManifestPut(t *testing.T) {
	var mu sync.Mutex
	refuse := false
	origin := startRecorder(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		no := refuse
		mu.Unlock()
		body, _ := io.ReadAll(r.Body)
		switch {
		case r.Method == http.MethodPut && no:
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"errors":[{"code":"MANIFEST_INVALID","message":"no"}]}`))
		case r.Method == http.MethodPut:
			w.Header().Set("Docker-Content-Digest", digest.FromBytes(body).String())
			w.Header().Set("Oci-Subject", "sha256:"+strings.Repeat("5", 64))
			w.Header().Set("Location", "http://elsewhere.example/v2/team/app/manifests/"+digest.FromBytes(body).String())
			w.WriteHeader(http.StatusCreated)
		case r.Method == http.MethodHead && strings.HasSuffix(r.URL.Path, "/manifests/v1"):
			w.Header().Set("Docker-Content-Digest", r.Header.Get("X-Want"))
			w.WriteHeader(http.StatusOK)
		default:
			w.WriteHeader(http.StatusOK) // authorization HEADs
		}
	})
	o := origin.addr()
	c := newCache(t, o)
	const mediaType = "application/vnd.oci.image.manifest.v1+json"
	body := []byte(`{"schemaVersion":2,"mediaType":"` + mediaType + `","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[],"subject":{"mediaType":"` + mediaType + `","digest":"sha256:` + strings.Repeat("5", 64) + `","size":1}}`)
	d := digest.FromBytes(body)
	for _, ref := range []string{d.String(), "v1"} {
		resp, got := send(t, http.MethodPut, c.url(o, "/v2/team/app/manifests/"+ref), body, map[string]string{"Content-Type": mediaType})
		expect(t, "PUT "+ref, resp, got, http.StatusCreated)
		if resp.Header.Get("Oci-Subject") != "sha256:"+strings.Repeat("5", 64) || resp.Header.Get("Docker-Content-Digest") != d.String() {
			t.Fatalf("PUT %s: OCI-Subject %q, Docker-Content-Digest %q", ref, resp.Header.Get("Oci-Subject"), resp.Header.Get("Docker-Content-Digest"))
		}
		if loc := resolve(t, c, o, resp.Header.Get("Location")); !strings.Contains(loc, "/v2/team/app/manifests/"+d.String()) || strings.Contains(loc, "elsewhere") {
			t.Fatalf("PUT %s: Location %q", ref, loc)
		}
	}
	if got := origin.requests(); len(got) != 2 || got[0] != "PUT /v2/team/app/manifests/"+d.String() || got[1] != "PUT /v2/team/app/manifests/v1" {
		t.Fatalf("the origin received %v", got)
	}
	// Served from the cache by digest, with its type (the authorization HEAD only).
	resp, got := mustGet(t, c.url(o, "/v2/team/app/manifests/"+d.String()), map[string]string{"Accept": mediaType}, 200)
	if !bytes.Equal(got, body) || resp.Header.Get("Content-Type") != mediaType {
		t.Fatalf("the pushed manifest through the cache: %q %s", resp.Header.Get("Content-Type"), got)
	}
	for _, q := range origin.requests()[2:] {
		if strings.HasPrefix(q, "GET") {
			t.Fatalf("the pushed manifest was fetched from the origin: %s", q)
		}
	}
	// Refused: relayed, nothing kept.
	mu.Lock()
	refuse = true
	mu.Unlock()
	other := append([]byte(nil), body...)
	other = bytes.Replace(other, []byte(`"layers":[]`), []byte(`"layers":[] `), 1)
	resp, got = send(t, http.MethodPut, c.url(o, "/v2/team/app/manifests/v2"), other, map[string]string{"Content-Type": mediaType})
	expect(t, "refused PUT", resp, got, http.StatusBadRequest)
	if !strings.Contains(string(got), "MANIFEST_INVALID") {
		t.Fatalf("the origin's error was not relayed: %s", got)
	}
	if _, err := c.store.Stat(t.Context(), digest.FromBytes(other)); err == nil {
		t.Fatal("a manifest the origin refused was stored")
	}
}

// A bounded store (proxy/evict) reserves room for a pushed blob before storing it: a blob
// larger than the bound is not kept, and the push is not affected; a small one is kept.
func TestPushIntoBoundedStore(t *testing.T) {
	reg := peers.StartRegistry(t)
	dir := t.TempDir()
	inner, err := filesystem.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	bounded, err := evict.New(inner, evict.Config{MaxSize: 1 << 20, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	bounded.Start(t.Context())
	t.Cleanup(func() { _ = bounded.Close(context.Background()) })
	c := newCacheWith(t, func(cfg *server.Config) {
		cfg.Storage = bounded
		cfg.Reserve = bounded.Reserve
		cfg.SpoolDir = filepath.Join(dir, "spool")
	}, reg.Addr)
	for _, tc := range []struct {
		size int
		kept bool
	}{{3 << 20, false}, {4096, true}} {
		blob := randomBytes(t, tc.size)
		d := digest.FromBytes(blob)
		resp, body := send(t, http.MethodPost, c.url(reg.Addr, "/v2/team/app/blobs/uploads/"), nil, nil)
		expect(t, "POST", resp, body, http.StatusAccepted)
		loc := resolve(t, c, reg.Addr, resp.Header.Get("Location"))
		resp, body = send(t, http.MethodPut, withQuery(loc, "digest", d.String()), blob, map[string]string{"Content-Type": "application/octet-stream"})
		expect(t, "PUT", resp, body, http.StatusCreated)
		c.settle(t)
		if _, err := bounded.Stat(t.Context(), d); (err == nil) != tc.kept {
			t.Fatalf("a pushed blob of %d bytes into a 1 MiB store: kept=%v, want %v", tc.size, err == nil, tc.kept)
		}
		if _, got := mustGet(t, "http://"+reg.Addr+"/v2/team/app/blobs/"+d.String(), nil, 200); !bytes.Equal(got, blob) {
			t.Fatal("the origin does not hold the pushed bytes")
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "spool", "uploads")); len(ents) != 0 {
		t.Fatalf("%d spool files left", len(ents))
	}
}
