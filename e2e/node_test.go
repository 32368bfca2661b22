package e2e

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// containerd -> cove-node -> cove-cache -> origin, with ctr and crictl.
func TestPullThroughNodeAndCache(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 3, 2<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	node := peers.StartCoveNode(t, []string{cove.URL}, "--origin-plain-http", origin.Addr)
	a := peers.StartContainerd(t, peers.WithMirror(node.URL))
	if err := a.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, a, img)
	b := peers.StartContainerd(t, peers.WithMirror(node.URL))
	if err := b.CrictlPull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, b, img)
	for _, d := range allBlobs(img) {
		if n := origin.BlobGETs()[d]; n != 1 {
			t.Errorf("origin GETs of %s = %d, want 1", d, n)
		}
	}
	if n := node.Metric(t, "cove_node_requests_total", `served_by="origin"`) + node.Metric(t, "cove_node_requests_total", `served_by="handoff"`); n != 0 {
		t.Fatalf("%v requests fell back to the origin with a healthy cache", n)
	}
}

// Every way cove-cache can fail: the pull completes, right, within a few seconds.
func TestPullSurvivesCacheFailures(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 3, 8<<20)
	// Through this slow link a cold pull through the cache takes about 3 s, long enough
	// to break cove-cache in the middle of it.
	slow := throttle(t, origin.URL, 8<<20)
	ref := slow + "/team/app:v1"

	status503 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	defer status503.Close()
	closed, _ := net.Listen("tcp", "127.0.0.1:0")
	refused := "http://" + closed.Addr().String()
	closed.Close()

	for _, tc := range []struct {
		name   string
		cache  func(t *testing.T) string            // the cache URL cove-node is given
		during func(t *testing.T, cove *peers.Cove) // what happens 1 s into the pull
	}{
		{name: "refused", cache: func(*testing.T) string { return refused }},
		{name: "503", cache: func(*testing.T) string { return status503.URL }},
		{name: "hung", cache: func(t *testing.T) string {
			c := peers.StartCove(t, "", "--origin-plain-http", slow)
			c.Freeze()
			t.Cleanup(c.Thaw)
			return c.URL
		}},
		{name: "stalling-mid-pull", during: func(t *testing.T, c *peers.Cove) { c.Freeze(); t.Cleanup(c.Thaw) }},
		{name: "killed-mid-pull", during: func(t *testing.T, c *peers.Cove) { c.Kill9() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t)
			var cove *peers.Cove
			cacheURL := ""
			if tc.cache != nil {
				cacheURL = tc.cache(t)
			} else {
				cove = peers.StartCove(t, "", "--origin-plain-http", slow)
				cacheURL = cove.URL
			}
			node := peers.StartCoveNode(t, []string{cacheURL}, "--origin-plain-http", slow)
			c := peers.StartContainerd(t, peers.WithMirror(node.URL))
			if tc.during != nil {
				timer := time.AfterFunc(time.Second, func() { tc.during(t, cove) })
				defer timer.Stop()
			}
			start := time.Now()
			if err := c.Pull(ctx, ref); err != nil {
				t.Fatal(err)
			}
			took := time.Since(start)
			got, err := c.ImageTarget(ctx, ref)
			if err != nil || got != img.Digest {
				t.Fatalf("target %s, %v; want %s", got, err, img.Digest)
			}
			if err := c.ReadAllContent(ctx, ref); err != nil {
				t.Fatal(err)
			}
			fallbacks := node.Metric(t, "cove_node_requests_total", `served_by="origin"`) +
				node.Metric(t, "cove_node_requests_total", `served_by="handoff"`)
			t.Logf("%s: pull took %s; fallbacks %v (handed off %v), resumes %v", tc.name, took.Round(time.Millisecond),
				fallbacks, node.Metric(t, "cove_node_requests_total", `served_by="handoff"`), node.Metric(t, "cove_node_resumes_total"))
			if took > 15*time.Second {
				t.Fatalf("pull took %s", took)
			}
			if fallbacks == 0 {
				t.Fatal("nothing fell back: the failure was not exercised")
			}
		})
	}
}

// Mirror-only mode with cove-node stopped: containerd falls back to the origin by itself.
func TestNodeStoppedContainerdFallsBack(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 2, 1<<20)
	node := peers.StartCoveNode(t, nil, "--origin-plain-http", origin.Addr)
	node.Stop()
	c := peers.StartContainerd(t, peers.WithMirror(node.URL))
	start := time.Now()
	if err := c.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, c, img)
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("fallback took %s", took)
	}
}

// slowOrigin delays the origin's answers to blob GETs: a slow registry.
func slowOrigin(t *testing.T, originURL string, delay time.Duration) string {
	u, _ := url.Parse(originURL)
	rp := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
			select {
			case <-time.After(delay):
			case <-r.Context().Done():
				return
			}
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

// A slow origin behind a healthy cove-cache: every node keeps pulling through the cache
// (one origin GET per blob), none stampedes to the origin.
func TestSlowOriginBehindHealthyCache(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 2, 1<<20)
	slow := slowOrigin(t, origin.URL, 3*time.Second) // longer than the 2 s header timeout
	ref := slow + "/team/app:v1"
	cove := peers.StartCove(t, "", "--origin-plain-http", slow)
	var nodes []*peers.CoveNode
	var ctrds []*peers.Containerd
	for range 3 {
		n := peers.StartCoveNode(t, []string{cove.URL}, "--origin-plain-http", slow)
		nodes = append(nodes, n)
		ctrds = append(ctrds, peers.StartContainerd(t, peers.WithMirror(n.URL)))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(ctrds))
	for i, c := range ctrds {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = c.Pull(ctx, ref) }()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
	}
	for _, d := range allBlobs(img) {
		if n := origin.BlobGETs()[d]; n != 1 {
			t.Errorf("origin GETs of %s = %d, want 1: nodes went around the cache", d, n)
		}
	}
	for i, n := range nodes {
		if f := n.Metric(t, "cove_node_requests_total", `served_by="origin"`) + n.Metric(t, "cove_node_requests_total", `served_by="handoff"`); f != 0 {
			t.Errorf("node %d fell back %v times", i, f)
		}
	}
}

// CRI's local pull path (use_local_image_pull) goes through cove-node too.
func TestCRILocalPullThroughNode(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 2, 1<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	node := peers.StartCoveNode(t, []string{cove.URL}, "--origin-plain-http", origin.Addr)
	c := peers.StartContainerd(t, peers.WithMirror(node.URL), peers.WithCRILocalPull())
	if err := c.CrictlPull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, c, img)
	if n := node.Metric(t, "cove_node_requests_total", `served_by="cache"`); n < float64(len(allBlobs(img))) {
		t.Fatalf("cove-node served %v requests from the cache: CRI's local pull went around it", n)
	}
}
