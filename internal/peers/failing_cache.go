package peers

import (
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
)

// CacheFailure is how a FailingCache fails once it has answered a GET of a manifest.
type CacheFailure int

const (
	// HangAfterManifest accepts every later request, /healthz included, and never
	// answers it: a cove-cache that froze right after serving a manifest, when the
	// prefill of its blobs starts.
	HangAfterManifest CacheFailure = iota
	// StallAfterManifest lets later blob GETs send their headers and the first
	// stallAfter bytes of the body, then nothing more; once a body has stalled, every
	// new request, /healthz included, hangs: a cove-cache that froze mid-transfer.
	StallAfterManifest
)

// FailingCache relays a real cove-cache (a process or an in-process server) until it
// has answered a GET of a manifest, then fails as told. Requests it holds are released
// at cleanup, or when their client gives up.
type FailingCache struct {
	// URL is http://127.0.0.1:PORT, the cache URL to give cove-node.
	URL string

	failure    CacheFailure
	stallAfter int64
	release    chan struct{}

	mu       sync.Mutex
	tripped  bool // a manifest GET was answered
	frozen   bool // a body stalled
	blobGETs map[string]int
}

// StartFailingCache starts a FailingCache in front of cacheURL, stopped at cleanup.
func StartFailingCache(t testing.TB, cacheURL string, failure CacheFailure, stallAfter int64) *FailingCache {
	t.Helper()
	u, err := url.Parse(cacheURL)
	if err != nil {
		t.Fatalf("peers: %v", err)
	}
	c := &FailingCache{failure: failure, stallAfter: stallAfter, release: make(chan struct{}), blobGETs: map[string]int{}}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1 // every byte the cache sent reaches the client before a stall
	rp.ModifyResponse = c.modify
	rp.ErrorLog = log.New(io.Discard, "", 0) // the stalls it makes are not news
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c.holds(r) {
			select {
			case <-r.Context().Done():
			case <-c.release:
			}
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		srv.CloseClientConnections()
		srv.Close()
	})
	t.Cleanup(func() { close(c.release) }) // runs first: lets held handlers return
	c.URL = srv.URL
	return c
}

// Tripped reports whether the cache has started failing.
func (c *FailingCache) Tripped() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tripped
}

// BlobGETs counts the blob GETs that arrived after the cache tripped, by digest.
func (c *FailingCache) BlobGETs() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := map[string]int{}
	for k, v := range c.blobGETs {
		m[k] = v
	}
	return m
}

// holds says whether r is to be accepted and never answered.
func (c *FailingCache) holds(r *http.Request) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.tripped {
		return false
	}
	isBlobGET := r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/")
	if isBlobGET {
		c.blobGETs[r.URL.Path[strings.LastIndex(r.URL.Path, "/")+1:]]++
	}
	// StallAfterManifest holds nothing, /healthz included, until a body stalls: a
	// cache that answers its health probe while a cold blob's headers are on their way
	// (slow under load) is healthy, and must not be failed for it.
	return c.failure == HangAfterManifest || c.frozen
}

func (c *FailingCache) modify(resp *http.Response) error {
	req := resp.Request
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case !c.tripped:
		if req.Method == http.MethodGet && strings.Contains(req.URL.Path, "/manifests/") && resp.StatusCode == http.StatusOK {
			c.tripped = true // this answer still goes out whole
		}
	case strings.Contains(req.URL.Path, "/blobs/") && (resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusPartialContent):
		resp.Body = &stallingBody{ReadCloser: resp.Body, left: c.stallAfter, c: c, done: req.Context().Done()}
	}
	return nil
}

// stallingBody passes on left bytes, then blocks until its request ends or the cache is
// released.
type stallingBody struct {
	io.ReadCloser
	left int64
	c    *FailingCache
	done <-chan struct{}
}

func (s *stallingBody) Read(p []byte) (int, error) {
	if s.left <= 0 {
		s.c.mu.Lock()
		s.c.frozen = true
		s.c.mu.Unlock()
		select {
		case <-s.done:
		case <-s.c.release:
		}
		return 0, io.ErrUnexpectedEOF
	}
	if int64(len(p)) > s.left {
		p = p[:s.left]
	}
	n, err := s.ReadCloser.Read(p)
	s.left -= int64(n)
	return n, err
}
