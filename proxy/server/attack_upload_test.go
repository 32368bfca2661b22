package server_test

// Attack tests: the upload handle. cove-cache maps the origin's upload URL to a handle of
// its own; a client must never be able to make cove-cache send a request to another host,
// or to another path than that registry's /v2/<repository>/blobs/uploads/..., whatever
// handle, path, ns= or query it sends, and whatever Location the origin answers.

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
)

// recorder is an HTTP server that records every request and answers with answer.
type recorder struct {
	srv    *httptest.Server
	mu     sync.Mutex
	seen   []string // "METHOD path?query"
	answer func(w http.ResponseWriter, r *http.Request)
}

func startRecorder(t *testing.T, answer func(w http.ResponseWriter, r *http.Request)) *recorder {
	rec := &recorder{answer: answer}
	rec.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec.mu.Lock()
		rec.seen = append(rec.seen, r.Method+" "+r.URL.RequestURI())
		rec.mu.Unlock()
		rec.answer(w, r)
	}))
	t.Cleanup(rec.srv.Close)
	return rec
}

func (r *recorder) addr() string { return strings.TrimPrefix(r.srv.URL, "http://") }

func (r *recorder) requests() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.seen...)
}

func TestAttackUploadHandle(t *testing.T) {
	evil := startRecorder(t, func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusAccepted) })
	var mu sync.Mutex
	nextLocation := "/v2/team/app/blobs/uploads/u1?_state=s1"
	origin := startRecorder(t, func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		loc := nextLocation
		mu.Unlock()
		switch {
		case r.Method == http.MethodPut:
			w.Header().Set("Docker-Content-Digest", r.URL.Query().Get("digest"))
			w.WriteHeader(http.StatusCreated)
		case r.Method == http.MethodPost || r.Method == http.MethodPatch:
			w.Header().Set("Location", loc)
			w.Header().Set("Range", "0-0")
			w.WriteHeader(http.StatusAccepted)
		default:
			w.WriteHeader(http.StatusNoContent)
		}
	})
	o := origin.addr()
	c := newCache(t, o, evil.addr())
	setLocation := func(l string) { mu.Lock(); nextLocation = l; mu.Unlock() }

	// Locations the origin may not send cove-cache to: each is refused (502), and
	// nothing reaches the other host.
	for _, loc := range []string{
		"http://" + evil.addr() + "/v2/team/app/blobs/uploads/u1",
		"//" + evil.addr() + "/v2/team/app/blobs/uploads/u1",
		"http://user:pw@" + o + "/v2/team/app/blobs/uploads/u1",
		"/v2/other/app/blobs/uploads/u1",
		"/v2/team/app/blobs/uploads/../../../../admin",
		"/v2/team/app/blobs/uploads/%2e%2e%2fx",
		"/v2/team/app/blobs/uploads/",
		"/v2/team/app/blobs/uploads/u1/x",
		"/admin",
	} {
		setLocation(loc)
		resp, body := send(t, http.MethodPost, c.url(o, "/v2/team/app/blobs/uploads/"), nil, nil)
		if resp.StatusCode != http.StatusBadGateway {
			t.Errorf("origin Location %q: status %d, want 502: %s", loc, resp.StatusCode, body)
		}
	}
	if n := c.srv.UploadSessions(); n != 0 {
		t.Fatalf("%d sessions opened for refused Locations", n)
	}

	// A legitimate session; its Location is cove-cache's, with an opaque handle.
	setLocation("/v2/team/app/blobs/uploads/u1?_state=s1")
	resp, body := send(t, http.MethodPost, c.url(o, "/v2/team/app/blobs/uploads/"), nil, nil)
	expect(t, "POST", resp, body, http.StatusAccepted)
	loc := resolve(t, c, o, resp.Header.Get("Location"))
	if strings.Contains(loc, "u1") || strings.Contains(loc, "s1") {
		t.Fatalf("the client's Location %q carries the origin's upload URL", loc)
	}
	u, _ := url.Parse(loc)
	handle := u.Path[strings.LastIndex(u.Path, "/")+1:]

	before := len(origin.requests())
	// Handles and routes the client may try: none reaches any origin.
	for _, p := range []string{
		c.url(o, "/v2/team/app/blobs/uploads/AAAAAAAAAAAAAAAAAAAAAA"),                 // made up
		c.url(o, "/v2/other/app/blobs/uploads/"+handle),                               // another repository
		c.url(evil.addr(), "/v2/team/app/blobs/uploads/"+handle),                      // another registry by ns=
		c.http.URL + "/v2/" + evil.addr() + "/team/app/blobs/uploads/" + handle,       // by path prefix
		c.http.URL + "/v2/team/app/blobs/uploads/" + handle,                           // the default registry
		c.url(o, "/v2/team/app/blobs/uploads/"+handle+"%2F..%2F..%2Fadmin"),           // escapes
		c.url(o, "/v2/team/app/blobs/uploads/..%2F..%2Fadmin"),                        // escapes
		c.url(o, "/v2/team/app/blobs/uploads/"+url.PathEscape("http://"+evil.addr())), // a URL as handle
	} {
		for _, m := range []string{http.MethodPatch, http.MethodGet, http.MethodPut, http.MethodDelete} {
			resp, body := send(t, m, withQuery(p, "digest", "sha256:"+strings.Repeat("a", 64)), []byte("x"), nil)
			if resp.StatusCode != http.StatusNotFound && resp.StatusCode != http.StatusBadRequest {
				t.Errorf("%s %s: status %d, want 404 or 400: %s", m, p, resp.StatusCode, body)
			}
		}
	}
	if got := origin.requests()[before:]; len(got) != 0 {
		t.Fatalf("the origin received %v", got)
	}
	if got := evil.requests(); len(got) != 0 {
		t.Fatalf("another host received %v", got)
	}

	// The client's query never reaches the origin beyond digest=: the origin's own
	// upload URL and state are what is sent.
	resp, body = send(t, http.MethodPatch, withQuery(loc, "_state", "forged", "from", "x"), []byte("x"), nil)
	expect(t, "PATCH", resp, body, http.StatusAccepted)
	loc = resolve(t, c, o, resp.Header.Get("Location"))
	resp, body = send(t, http.MethodPut, withQuery(loc, "digest", "sha256:"+strings.Repeat("b", 64), "_state", "forged"), nil, nil)
	expect(t, "PUT", resp, body, http.StatusCreated)
	got := origin.requests()[before:]
	want := []string{
		"PATCH /v2/team/app/blobs/uploads/u1?_state=s1",
		"PUT /v2/team/app/blobs/uploads/u1?_state=s1&digest=sha256%3A" + strings.Repeat("b", 64),
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("the origin received\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// A Location answered to a chunk that points elsewhere ends the session.
	resp, body = send(t, http.MethodPost, c.url(o, "/v2/team/app/blobs/uploads/"), nil, nil)
	expect(t, "POST", resp, body, http.StatusAccepted)
	loc = resolve(t, c, o, resp.Header.Get("Location"))
	setLocation("http://" + evil.addr() + "/v2/team/app/blobs/uploads/u1")
	resp, body = send(t, http.MethodPatch, loc, []byte("x"), nil)
	expect(t, "PATCH answered with a foreign Location", resp, body, http.StatusBadGateway)
	resp, body = send(t, http.MethodPatch, loc, []byte("x"), nil)
	expect(t, "PATCH after the foreign Location", resp, body, http.StatusNotFound)
	if got := evil.requests(); len(got) != 0 {
		t.Fatalf("another host received %v", got)
	}
}

// Tenant B pushes, through cove-cache, manifests into its own repository that list tenant
// A's cached layer (as subject, as a layer, as a non-distributable layer), and tries a
// cross-repository mount from A's repository. What the origin accepts is stored, but
// only the origin's 201 for a digest in B's repository is its word that B's repository
// holds it: B's request for A's layer in B's repository gets the origin's answer (404),
// never A's bytes.
func TestAttackPushedManifestTeachesNothing(t *testing.T) {
	o := peers.StartTokenOrigin(t, tenantPasswords, peers.WithManifestURLs(`^https://`))
	admin := o.Passwords[peers.TokenAdmin]
	imgA := o.Push(t, "team-a/app:v1", 1, 64<<10)
	imgB := o.Push(t, "team-b/app:v1", 1, 4096)
	c := newCache(t, o.Addr)
	a := tokenHeader(t, o, "team-a", "repository:team-a/app:pull")
	pullThrough(t, c, o.Addr, "team-a/app", "v1", imgA, a)
	b := tokenHeader(t, o, "team-b", "repository:team-b/app:pull,push repository:team-a/app:pull")

	layer := map[string]any{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": imgA.Layers[0], "size": 1}
	for _, tc := range []struct {
		name   string
		edit   func(m map[string]any)
		status int // the origin's answer to the push
	}{
		{"subject names A's layer", func(m map[string]any) { m["subject"] = layer }, http.StatusCreated},
		{"non-distributable layer is A's layer", func(m map[string]any) {
			m["layers"] = append(m["layers"].([]any), map[string]any{
				"mediaType": nonDistributableLayer, "digest": imgA.Layers[0], "size": 1, "urls": []string{"https://layers.example/a"}})
		}, http.StatusCreated},
		{"a layer is A's layer", func(m map[string]any) { m["layers"] = append(m["layers"].([]any), layer) }, http.StatusBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tag := "plant-" + sha([]byte(tc.name))[7:19]
			body := plantingManifest(t, o.Addr, imgB, peers.TokenAdmin, admin, tc.edit)
			hdr := map[string]string{"Authorization": b["Authorization"], "Content-Type": "application/vnd.oci.image.manifest.v1+json"}
			resp, got := send(t, http.MethodPut, c.url(o.Addr, "/v2/team-b/app/manifests/"+tag), body, hdr)
			expect(t, "B's manifest PUT through the cache", resp, got, tc.status)
			if tc.status == http.StatusCreated {
				if resp.Header.Get("Docker-Content-Digest") != sha(body) {
					t.Fatalf("Docker-Content-Digest %q, want %s", resp.Header.Get("Docker-Content-Digest"), sha(body))
				}
				if _, got := mustGet(t, c.url(o.Addr, "/v2/team-b/app/manifests/"+tag), b, 200); string(got) != string(body) {
					t.Fatal("the pushed manifest did not come back")
				}
			}
			sameAsOrigin(t, c, o.Addr, "/v2/team-b/app/blobs/"+imgA.Layers[0], b, imgA.Layers[0])
			if resp, _, err := do(t, http.MethodHead, c.url(o.Addr, "/v2/team-b/app/blobs/"+imgA.Layers[0]), b); err != nil || resp.StatusCode == 200 {
				t.Fatalf("HEAD of A's layer in B's repository: %v %v", resp.StatusCode, err)
			}
		})
	}
	// A mount of A's layer into B's repository: the origin does not mount it for B
	// (202, a plain upload), so nothing is learned.
	resp, body := send(t, http.MethodPost, withQuery(c.url(o.Addr, "/v2/team-b/app/blobs/uploads/"), "mount", imgA.Layers[0], "from", "team-a/app"), nil, b)
	if resp.StatusCode == http.StatusCreated {
		t.Fatalf("the origin mounted A's layer for B: %s", body)
	}
	sameAsOrigin(t, c, o.Addr, "/v2/team-b/app/blobs/"+imgA.Layers[0], b, imgA.Layers[0])
	// Control: A still reads its layer from the cache.
	if _, got := mustGet(t, c.url(o.Addr, "/v2/team-a/app/blobs/"+imgA.Layers[0]), a, 200); sha(got) != imgA.Layers[0] {
		t.Fatal("A's layer: wrong bytes")
	}
}
