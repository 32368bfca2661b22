package mirror_test

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/plugin/breaker"
	"github.com/cove-oci/cove/plugin/mirror"
	"github.com/cove-oci/cove/proxy/server"
	"github.com/cove-oci/cove/proxy/storage/filesystem"
)

// fast timeouts keep the suite quick; the e2e tests use the defaults.
func fastConfig(caches ...string) mirror.Config {
	return mirror.Config{
		Caches:            caches,
		ConnectTimeout:    300 * time.Millisecond,
		HeaderTimeout:     300 * time.Millisecond,
		StallTimeout:      300 * time.Millisecond,
		SlowOriginTimeout: 10 * time.Second,
		ProbeTimeout:      200 * time.Millisecond,
		ProbeInterval:     -1, // each test exercises the per-request detection
		Fallback:          mirror.FallbackRelay,
	}
}

type served struct {
	mu     sync.Mutex
	counts map[string]int
}

func (s *served) observe(by, reason string, resumed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := by
	if reason != "" {
		k += "/" + reason
	}
	if resumed {
		k += "/resumed"
	}
	s.counts[k]++
}

// get returns how many requests were served as k, waiting briefly for at least one: a
// handler records its outcome just after its last byte, which the client may already
// have read.
func (s *served) get(k string) int { return s.wait(k, 1) }

// wait returns how many requests were served as k once there are at least want, or
// after a second.
func (s *served) wait(k string, want int) int {
	deadline := time.Now().Add(time.Second)
	for {
		s.mu.Lock()
		n := s.counts[k]
		s.mu.Unlock()
		if n >= want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func startMirror(t *testing.T, cfg mirror.Config, origin string) (*httptest.Server, *served) {
	t.Helper()
	obs := &served{counts: map[string]int{}}
	cfg.PlainHTTP = []string{origin}
	cfg.Observe = obs.observe
	h, err := mirror.New(cfg, breaker.WithBackoff(time.Second, 2*time.Second), breaker.WithProbeInterval(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv, obs
}

func startCache(t *testing.T, origin string) *httptest.Server {
	t.Helper()
	dir := t.TempDir()
	store, err := filesystem.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(server.Config{Storage: store, SpoolDir: filepath.Join(dir, "spool"), PlainHTTP: []string{origin}})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv)
	t.Cleanup(hs.Close)
	return hs
}

func getBlob(t *testing.T, mirrorURL, origin, repo, dgst string) (string, time.Duration) {
	t.Helper()
	start := time.Now()
	resp, err := http.Get(mirrorURL + "/v2/" + repo + "/blobs/" + dgst + "?ns=" + url.QueryEscape(origin))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	h := sha256.New()
	if _, err := io.Copy(h, resp.Body); err != nil {
		t.Fatalf("body: %v", err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), time.Since(start)
}

func TestServedByCache(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 2<<20)
	cache := startCache(t, origin.Addr)
	m, obs := startMirror(t, fastConfig(cache.URL), origin.Addr)
	for range 2 {
		if got, _ := getBlob(t, m.URL, origin.Addr, "team/app", img.Layers[0]); got != img.Layers[0] {
			t.Fatal("wrong blob")
		}
	}
	if obs.wait("cache", 2) != 2 || origin.BlobGETs()[img.Layers[0]] != 1 {
		t.Fatalf("served %v, origin GETs %d", obs.counts, origin.BlobGETs()[img.Layers[0]])
	}
}

// hungListener accepts connections and never answers: a wedged cove-cache.
func hungListener(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return "http://" + ln.Addr().String()
}

func refusedURL(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr
}

// stallingCache relays a real cove-cache but stops every blob body after limit bytes and
// then hangs, with its health endpoint hung too: a cache that froze mid-transfer.
func stallingCache(t *testing.T, real string, limit int64) string {
	u, _ := url.Parse(real)
	rp := httputil.NewSingleHostReverseProxy(u)
	frozen := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	rp.ModifyResponse = func(resp *http.Response) error {
		if strings.Contains(resp.Request.URL.Path, "/blobs/") && (resp.StatusCode == 200 || resp.StatusCode == 206) {
			resp.Body = &stallAfter{r: resp.Body, left: limit, frozen: frozen, once: &once, release: release}
		}
		return nil
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			select {
			case <-frozen:
				select {
				case <-r.Context().Done():
				case <-release:
				}
				return
			default:
			}
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		srv.CloseClientConnections()
		srv.Close()
	})
	t.Cleanup(func() { close(release) }) // runs first: unfreeze, so Close can finish
	return srv.URL
}

type stallAfter struct {
	r       io.ReadCloser
	left    int64
	frozen  chan struct{}
	once    *sync.Once
	release chan struct{}
}

func (s *stallAfter) Read(p []byte) (int, error) {
	if s.left <= 0 {
		s.once.Do(func() { close(s.frozen) })
		<-s.release
		return 0, io.ErrUnexpectedEOF
	}
	if int64(len(p)) > s.left {
		p = p[:s.left]
	}
	n, err := s.r.Read(p)
	s.left -= int64(n)
	return n, err
}

func (s *stallAfter) Close() error { return s.r.Close() }

func TestFallback(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 4<<20)
	real := startCache(t, origin.Addr)
	status503 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	defer status503.Close()

	for _, tc := range []struct {
		name, cache, want string
	}{
		{"refused", refusedURL(t), "origin/connect"},
		{"hung", hungListener(t), "origin/headers"},
		{"503", status503.URL, "origin/status"},
		{"stalling-mid-blob", stallingCache(t, real.URL, 1<<20), "origin/stall/resumed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, obs := startMirror(t, fastConfig(tc.cache), origin.Addr)
			got, took := getBlob(t, m.URL, origin.Addr, "team/app", img.Layers[0])
			if got != img.Layers[0] {
				t.Fatalf("wrong blob: %s", got)
			}
			if obs.get(tc.want) != 1 {
				t.Fatalf("served %v, want one %s", obs.counts, tc.want)
			}
			t.Logf("%s: %s", tc.name, took)
			// The breaker is open now: the next request goes straight to the origin.
			start := time.Now()
			if got, _ := getBlob(t, m.URL, origin.Addr, "team/app", img.Config); got != img.Config {
				t.Fatal("wrong config blob")
			}
			if obs.get("origin/breaker-open") != 1 || time.Since(start) > 3*time.Second {
				t.Fatalf("second request: %v in %s; want straight to the origin", obs.counts, time.Since(start))
			}
		})
	}
}

// A Range request that cove-cache breaks off resumes at the right offset.
func TestResumeKeepsRange(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 4<<20)
	real := startCache(t, origin.Addr)
	m, obs := startMirror(t, fastConfig(stallingCache(t, real.URL, 512<<10)), origin.Addr)
	whole, _ := http.Get(origin.URL + "/v2/team/app/blobs/" + img.Layers[0])
	full, _ := io.ReadAll(whole.Body)
	whole.Body.Close()
	req, _ := http.NewRequest(http.MethodGet, m.URL+"/v2/team/app/blobs/"+img.Layers[0]+"?ns="+url.QueryEscape(origin.Addr), nil)
	req.Header.Set("Range", "bytes=1000000-")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 206 || string(body) != string(full[1000000:]) {
		t.Fatalf("resumed range: status %d, %d bytes, err %v", resp.StatusCode, len(body), err)
	}
	if obs.get("origin/stall/resumed") != 1 {
		t.Fatalf("served %v", obs.counts)
	}
}

// slowHeaders delays the origin's answers: a slow registry behind a healthy cache.
func slowHeaders(t *testing.T, originURL string, delay time.Duration) string {
	u, _ := url.Parse(originURL)
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
			time.Sleep(delay)
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

// A slow origin behind a healthy cove-cache: the nodes keep waiting on the cache instead
// of all going to the origin at once.
func TestSlowOriginBehindHealthyCache(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 1<<20)
	slow := slowHeaders(t, origin.URL, 1500*time.Millisecond) // 5x the header timeout
	cache := startCache(t, slow)
	m, obs := startMirror(t, fastConfig(cache.URL), slow)
	var wg sync.WaitGroup
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if got, _ := getBlob(t, m.URL, slow, "team/app", img.Layers[0]); got != img.Layers[0] {
				t.Error("wrong blob")
			}
		}()
	}
	wg.Wait()
	if obs.wait("cache", 6) != 6 {
		t.Fatalf("served %v: every node should have waited on the healthy cache", obs.counts)
	}
	if n := origin.BlobGETs()[img.Layers[0]]; n != 1 {
		t.Fatalf("origin GETs = %d, want 1 (no egress storm)", n)
	}
}

// The origin's 401 challenge comes back through cove-cache and the mirror unchanged, and
// credentials go through.
func TestCredentialsThroughMirror(t *testing.T) {
	origin := peers.StartRegistry(t, peers.WithHtpasswd("alice", "pw-alice"))
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 1024, peers.WithPushAuth("alice", "pw-alice"))
	cache := startCache(t, origin.Addr)
	m, _ := startMirror(t, fastConfig(cache.URL), origin.Addr)
	u := m.URL + "/v2/team/app/blobs/" + img.Layers[0] + "?ns=" + url.QueryEscape(origin.Addr)
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("Www-Authenticate"), "Basic") {
		t.Fatalf("anonymous: %d %q", resp.StatusCode, resp.Header.Get("Www-Authenticate"))
	}
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	req.SetBasicAuth("alice", "pw-alice")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("with credentials: %d", resp.StatusCode)
	}
}

func TestBreakerClosesWhenCacheReturns(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 1024)
	var up atomic.Bool
	real := startCache(t, origin.Addr)
	u, _ := url.Parse(real.URL)
	rp := httputil.NewSingleHostReverseProxy(u)
	flaky := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !up.Load() {
			w.WriteHeader(503)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	defer flaky.Close()
	m, obs := startMirror(t, fastConfig(flaky.URL), origin.Addr)
	getBlob(t, m.URL, origin.Addr, "team/app", img.Layers[0])
	up.Store(true)
	deadline := time.Now().Add(5 * time.Second)
	for obs.get("cache") == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("breaker never closed: %v", obs.counts)
		}
		time.Sleep(150 * time.Millisecond)
		getBlob(t, m.URL, origin.Addr, "team/app", img.Layers[0])
	}
}

// A cache that hung between pulls is found by the background check: the next pull goes
// straight to the origin without waiting on it at all.
func TestBackgroundCheckBypassesDeadCache(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 1024)
	cfg := fastConfig(hungListener(t))
	cfg.ProbeInterval = 100 * time.Millisecond
	m, obs := startMirror(t, cfg, origin.Addr)
	time.Sleep(500 * time.Millisecond)
	_, took := getBlob(t, m.URL, origin.Addr, "team/app", img.Layers[0])
	// The metric proves the path; the time bound only catches a request that waited on
	// the hung cache (300 ms or more here), generously for a loaded machine.
	if obs.get("origin/breaker-open") != 1 || took > 2*time.Second {
		t.Fatalf("served %v in %s; want straight to the origin", obs.counts, took)
	}
}

// Handoff (the default): a request the cache cannot serve gets a 503 at once, so
// containerd goes to the origin itself; nothing is relayed.
func TestHandoff(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 1024)
	cfg := fastConfig(refusedURL(t))
	cfg.Fallback = mirror.FallbackHandoff
	m, obs := startMirror(t, cfg, origin.Addr)
	resp, err := http.Get(m.URL + "/v2/team/app/blobs/" + img.Layers[0] + "?ns=" + url.QueryEscape(origin.Addr))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || obs.get("handoff/connect") != 1 {
		t.Fatalf("status %d, served %v; want a 503 hand-off", resp.StatusCode, obs.counts)
	}
	if n := origin.BlobGETs()[img.Layers[0]]; n != 0 {
		t.Fatalf("cove-node fetched the blob from the origin itself (%d GETs)", n)
	}
	if _, err := mirror.New(mirror.Config{Fallback: "sometimes"}); err == nil {
		t.Fatal("an unknown fallback mode was accepted")
	}
}
