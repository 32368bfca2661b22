package mirror_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/plugin/mirror"
	"github.com/cove-oci/cove/proxy/cluster"
)

// countedCache is a real cove-cache whose blob requests are counted by digest.
type countedCache struct {
	*httptest.Server
	mu    sync.Mutex
	blobs map[string]int
}

func startCountedCache(t *testing.T, origin string) *countedCache {
	t.Helper()
	inner := startCache(t, origin)
	u, _ := url.Parse(inner.URL)
	c := &countedCache{blobs: map[string]int{}}
	c.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, d, ok := strings.Cut(r.URL.Path, "/blobs/"); ok {
			c.mu.Lock()
			c.blobs[d]++
			c.mu.Unlock()
		}
		proxyTo(w, r, u)
	}))
	t.Cleanup(c.Close)
	return c
}

func copyBody(w http.ResponseWriter, resp *http.Response) (int64, error) {
	buf := make([]byte, 32<<10)
	var n int64
	for {
		k, err := resp.Body.Read(buf)
		if k > 0 {
			if _, werr := w.Write(buf[:k]); werr != nil {
				return n, werr
			}
			n += int64(k)
		}
		if err != nil {
			return n, nil
		}
	}
}

func (c *countedCache) count(d string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.blobs[d]
}

// memberURL is a cache's URL in the form replicas hash (cluster.ParseMember).
func memberURL(t *testing.T, u string) string {
	m, err := cluster.ParseMember(u)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// Three replicas given as --cache, spelled as a user might (trailing slash, upper-case
// scheme): every blob goes to the replica that owns it by the replicas' own rendezvous
// ranking of its digest, and to no other. With the owner dead, the blob goes to the
// next in rank, the replica every other replica would move to.
func TestCachesRankedByOwner(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/rank:v1", 6, 64<<10)
	caches := []*countedCache{startCountedCache(t, origin.Addr), startCountedCache(t, origin.Addr), startCountedCache(t, origin.Addr)}
	byMember := map[string]*countedCache{}
	var members, flags []string
	for i, c := range caches {
		m := memberURL(t, c.URL)
		byMember[m] = c
		members = append(members, m)
		switch i {
		case 0:
			flags = append(flags, c.URL+"/")
		case 1:
			flags = append(flags, "HTTP://"+strings.TrimPrefix(c.URL, "http://"))
		default:
			flags = append(flags, c.URL)
		}
	}
	m, obs := startMirror(t, fastConfig(flags...), origin.Addr)
	blobs := append([]string{img.Config}, img.Layers...)
	owners := map[string]bool{}
	for _, d := range blobs {
		if got, _ := getBlob(t, m.URL, origin.Addr, "team/rank", d); got != d {
			t.Fatalf("blob %s: got %s", d, got)
		}
		owner := cluster.Owner(members, d)
		owners[owner] = true
		for member, c := range byMember {
			want := 0
			if member == owner {
				want = 1
			}
			if n := c.count(d); n != want {
				t.Errorf("blob %s: %d requests to %s, want %d (owner %s)", d, n, member, want, owner)
			}
		}
	}
	t.Logf("%d blobs over %d owners", len(blobs), len(owners))
	if n := obs.wait("cache", len(blobs)); n != len(blobs) {
		t.Fatalf("served %v", obs.counts)
	}

	// The owner of the first layer dies: the next in rank serves it.
	d := img.Layers[0]
	rank := cluster.Rank(members, d)
	byMember[rank[0]].Close()
	if got, _ := getBlob(t, m.URL, origin.Addr, "team/rank", d); got != d {
		t.Fatalf("with its owner dead: got %s", got)
	}
	if n := byMember[rank[1]].count(d); n != 1 {
		t.Errorf("with the owner %s dead, %d requests to the next in rank %s, want 1", rank[0], n, rank[1])
	}
	if n := byMember[rank[2]].count(d); n != 0 {
		t.Errorf("with the owner %s dead, %d requests to the last in rank %s, want 0", rank[0], n, rank[2])
	}
}

// A request without a digest (a manifest by tag) goes to the replica ranked first for
// its repository, so one repository's tags stay on one replica and repositories spread.
func TestCachesRankTagsByRepository(t *testing.T) {
	origin := peers.StartRegistry(t)
	peers.PushRandomImage(t, origin.Addr, "team/tagged:v1", 1, 16<<10)
	var tagReqs [3]int
	var mu sync.Mutex
	var urls []string
	for i := range 3 {
		inner := startCache(t, origin.Addr)
		u, _ := url.Parse(inner.URL)
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if strings.Contains(r.URL.Path, "/manifests/v1") {
				mu.Lock()
				tagReqs[i]++
				mu.Unlock()
			}
			proxyTo(w, r, u)
		}))
		t.Cleanup(srv.Close)
		urls = append(urls, srv.URL)
	}
	m, _ := startMirror(t, fastConfig(urls...), origin.Addr)
	req, _ := http.NewRequest(http.MethodHead, m.URL+"/v2/team/tagged/manifests/v1?ns="+url.QueryEscape(origin.Addr), nil)
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("HEAD by tag: %d", resp.StatusCode)
	}
	owner := cluster.Owner(urls, origin.Addr+"/team/tagged")
	for i, u := range urls {
		want := 0
		if u == owner {
			want = 1
		}
		if tagReqs[i] != want {
			t.Errorf("%s got %d tag requests, want %d (first in rank: %s)", u, tagReqs[i], want, owner)
		}
	}
}

func proxyTo(w http.ResponseWriter, r *http.Request, u *url.URL) {
	r.URL.Scheme, r.URL.Host = u.Scheme, u.Host
	rr, err := http.NewRequestWithContext(r.Context(), r.Method, r.URL.String(), nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	rr.Header = r.Header.Clone()
	resp, err := http.DefaultTransport.RoundTrip(rr)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = copyBody(w, resp)
}

// settableMembers is a Membership the test changes (the EndpointSlice one is tested
// against a real kube-apiserver in e2e).
type settableMembers struct {
	mu      sync.Mutex
	members []string
	changed chan struct{}
}

func (s *settableMembers) Members() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.members)
}

func (s *settableMembers) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

func (s *settableMembers) Run(context.Context) error { return nil }

func (s *settableMembers) set(m ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.members = m
	close(s.changed)
	s.changed = make(chan struct{})
}

// With Members, the members are the caches, ranked per blob, and the --cache URL (a
// Service) is the way in while there are none; the list follows the members, as
// Caches reports it.
func TestCachesFollowMembers(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/members:v1", 2, 64<<10)
	service := startCountedCache(t, origin.Addr)
	a, b := startCountedCache(t, origin.Addr), startCountedCache(t, origin.Addr)
	mem := &settableMembers{changed: make(chan struct{})}
	cfg := fastConfig(service.URL)
	cfg.Members = mem
	obs := &served{counts: map[string]int{}}
	cfg.PlainHTTP = []string{origin.Addr}
	cfg.Observe = obs.observe
	h, err := mirror.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	m := httptest.NewServer(h)
	t.Cleanup(m.Close)
	waitCaches := func(want ...string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; {
			var got []string
			for _, c := range h.Caches() {
				got = append(got, c.URL+" "+c.Source)
			}
			if slices.Equal(got, want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("caches %q, want %q", got, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	d := img.Layers[0]
	waitCaches(service.URL + " " + mirror.SourceFlag)
	if got, _ := getBlob(t, m.URL, origin.Addr, "team/members", d); got != d || service.count(d) != 1 {
		t.Fatalf("no members: the blob went elsewhere than the --cache URL (%d requests there)", service.count(d))
	}

	ma, mb := memberURL(t, a.URL), memberURL(t, b.URL)
	mem.set(ma, mb)
	sorted := []string{ma, mb}
	slices.Sort(sorted)
	waitCaches(sorted[0]+" "+mirror.SourceMembers, sorted[1]+" "+mirror.SourceMembers, service.URL+" "+mirror.SourceFlag)
	d = img.Layers[1]
	owner := map[string]*countedCache{ma: a, mb: b}[cluster.Owner([]string{ma, mb}, d)]
	if got, _ := getBlob(t, m.URL, origin.Addr, "team/members", d); got != d {
		t.Fatal("wrong blob")
	}
	if owner.count(d) != 1 || a.count(d)+b.count(d) != 1 || service.count(d) != 0 {
		t.Fatalf("with members, blob requests: owner %d, members %d, service %d; want 1, 1, 0", owner.count(d), a.count(d)+b.count(d), service.count(d))
	}

	mem.set(mb) // a leaves
	waitCaches(mb+" "+mirror.SourceMembers, service.URL+" "+mirror.SourceFlag)
	mem.set() // none: the Service again
	waitCaches(service.URL + " " + mirror.SourceFlag)
	d = img.Config
	if got, _ := getBlob(t, m.URL, origin.Addr, "team/members", d); got != d || service.count(d) != 1 {
		t.Fatalf("members gone: %d requests to the --cache URL, want 1", service.count(d))
	}
}

// The owner breaks a blob off mid-body and hangs: the node finishes it from the next
// cache in the blob's rank with a Range request (that replica takes the dead owner's
// blobs over, for every node), not from the origin, and containerd gets one whole body.
func TestResumeFromNextCacheInRank(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/next:v1", 1, 1<<20)
	d := img.Layers[0]
	real := startCache(t, origin.Addr)
	next := startCountedCache(t, origin.Addr)
	var stalling string
	for range 64 { // a stalling cache that owns d against next
		stalling = stallingCache(t, real.URL, 256<<10)
		if cluster.Owner([]string{memberURL(t, stalling), memberURL(t, next.URL)}, d) == memberURL(t, stalling) {
			break
		}
	}
	m, obs := startMirror(t, fastConfig(next.URL, stalling), origin.Addr)
	if got, _ := getBlob(t, m.URL, origin.Addr, "team/next", d); got != d {
		t.Fatalf("got %s", got)
	}
	if n := next.count(d); n != 1 {
		t.Errorf("%d requests to the next cache in rank, want 1 (the resume)", n)
	}
	if obs.get("cache/resumed") != 1 || obs.counts["origin/stall/resumed"] != 0 {
		t.Errorf("served %v, want the blob finished from the next cache", obs.counts)
	}
}
