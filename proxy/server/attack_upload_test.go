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
