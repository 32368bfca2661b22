package server_test

import (
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/server"
)

func headCount(reqs []peers.Request) int {
	n := 0
	for _, r := range reqs {
		if r.Method == http.MethodHead {
			n++
		}
	}
	return n
}

// A warm pull costs the origin one request (the tag's revalidation), not one per layer:
// the allowance for the repository and the memberships the manifest taught answer the
// rest.
func TestWarmPullAsksTheOriginOnce(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 20, 4096)
	c := newCache(t, origin.Addr)
	pull := func() {
		resp, _ := mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/v1"), map[string]string{"Accept": acceptManifests}, 200)
		if resp.Header.Get("Docker-Content-Digest") != img.Digest {
			t.Fatal("wrong manifest")
		}
		for _, d := range append([]string{img.Config}, img.Layers...) {
			if _, body := mustGet(t, c.url(origin.Addr, "/v2/team/app/blobs/"+d), nil, 200); sha(body) != d {
				t.Fatalf("blob %s", d)
			}
		}
		c.settle(t)
	}
	pull()
	before := len(origin.Requests())
	checks := testutil.ToFloat64(c.srv.Metrics().AuthzChecks)
	pull()
	reqs := origin.Requests()[before:]
	t.Logf("warm pull of a 20-layer image: %d origin requests (%d HEAD), %v authorization checks",
		len(reqs), headCount(reqs), testutil.ToFloat64(c.srv.Metrics().AuthzChecks)-checks)
	if len(reqs) != 1 || reqs[0].Method != http.MethodHead {
		t.Fatalf("warm pull made %d origin requests %v; want the tag's HEAD alone", len(reqs), reqs)
	}
}

// An allowance for one's own repository unlocks nothing of another's: a cached layer of
// team/a asked for through team/b (where the origin does not hold it) is refused.
func TestMembershipIsolatesRepositories(t *testing.T) {
	origin := peers.StartRegistry(t)
	a := peers.PushRandomImage(t, origin.Addr, "team/a:v1", 1, 4096)
	peers.PushRandomImage(t, origin.Addr, "team/b:v1", 1, 4096)
	c := newCache(t, origin.Addr)
	mustGet(t, c.url(origin.Addr, "/v2/team/a/blobs/"+a.Layers[0]), nil, 200)
	c.settle(t)
	// A fresh allowance for team/b.
	mustGet(t, c.url(origin.Addr, "/v2/team/b/manifests/v1"), map[string]string{"Accept": acceptManifests}, 200)
	resp, body, err := do(t, http.MethodGet, c.url(origin.Addr, "/v2/team/b/blobs/"+a.Layers[0]), nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusNotFound || sha(body) == a.Layers[0] {
		t.Fatalf("team/a's layer through team/b: %d", resp.StatusCode)
	}
}

// The offline policy: deny serves nothing cached with the origin down; recent serves a
// credential with a recent allowance, tags resolving to the last digest seen, marked
// stale, and refuses a credential the origin never allowed or allowed too long ago.
func TestOfflinePolicy(t *testing.T) {
	origin := peers.StartRegistry(t, peers.WithHtpasswd("alice", "pw-alice"), peers.WithHtpasswd("bob", "pw-bob"))
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 4096, peers.WithPushAuth("alice", "pw-alice"))
	const maxAge = 1500 * time.Millisecond
	c := newCacheWith(t, func(cfg *server.Config) {
		cfg.AuthzTTL = 100 * time.Millisecond
		cfg.Offline = server.OfflineRecent
		cfg.OfflineMaxAge = maxAge
	}, origin.Addr)
	basic := func(u, p string) map[string]string {
		return map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte(u+":"+p)), "Accept": acceptManifests}
	}
	alice, bob := basic("alice", "pw-alice"), basic("bob", "pw-bob")
	mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/v1"), alice, 200)
	mustGet(t, c.url(origin.Addr, "/v2/team/app/blobs/"+img.Layers[0]), alice, 200)
	c.settle(t)
	origin.Stop()
	time.Sleep(200 * time.Millisecond) // past the TTL, within the offline bound

	resp, body := mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/v1"), alice, 200)
	if sha(body) != img.Digest || !strings.HasPrefix(resp.Header.Get("Warning"), "110 ") {
		t.Fatalf("stale tag: digest %s, Warning %q", sha(body), resp.Header.Get("Warning"))
	}
	resp, body = mustGet(t, c.url(origin.Addr, "/v2/team/app/blobs/"+img.Layers[0]), alice, 200)
	if sha(body) != img.Layers[0] || resp.Header.Get("Warning") == "" {
		t.Fatal("stale blob")
	}
	// Bob never had an allowance: nothing.
	for _, p := range []string{"/v2/team/app/manifests/v1", "/v2/team/app/blobs/" + img.Layers[0]} {
		if resp, body, _ := do(t, http.MethodGet, c.url(origin.Addr, p), bob); resp.StatusCode < 500 || sha(body) == img.Layers[0] || sha(body) == img.Digest {
			t.Fatalf("%s for a credential the origin never allowed: %d", p, resp.StatusCode)
		}
	}
	if got := testutil.ToFloat64(c.srv.Metrics().Requests.WithLabelValues("blob", "stale")); got != 1 {
		t.Fatalf("stale blob requests counted %v", got)
	}
	// Past the bound: nothing, even for Alice.
	time.Sleep(maxAge)
	if resp, _, _ := do(t, http.MethodGet, c.url(origin.Addr, "/v2/team/app/blobs/"+img.Layers[0]), alice); resp.StatusCode < 500 {
		t.Fatalf("served past the offline bound: %d", resp.StatusCode)
	}
}

// A lying registry that answers 200 to every HEAD and serves a manifest listing another
// registry's cached layers unlocks none of them: membership in its repository is not
// provenance, and only bytes fetched from it could ever be served for it.
func TestLyingRegistryManifestUnlocksNothing(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team-a/app:v1", 2, 4096)
	lie := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"` +
		img.Config + `","size":1},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"` + img.Layers[0] + `","size":4096},{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"` + img.Layers[1] + `","size":4096}]}`)
	lieDigest := digest.FromBytes(lie).String()
	var liarBlobGETs atomic.Int32
	liar := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/manifests/") && !strings.Contains(r.URL.Path, img.Digest) {
			w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
			w.Header().Set("Docker-Content-Digest", lieDigest)
			w.Header().Set("Content-Length", strconv.Itoa(len(lie)))
			if r.Method == http.MethodGet {
				w.Write(lie)
			}
			return
		}
		// Every other HEAD: yes. Every GET: zeros.
		w.Header().Set("Content-Length", "4096")
		w.WriteHeader(200)
		if r.Method == http.MethodGet {
			liarBlobGETs.Add(1)
			w.Write(make([]byte, 4096))
		}
	}))
	defer liar.Close()
	liarAddr := strings.TrimPrefix(liar.URL, "http://")
	c := newCache(t, origin.Addr, liarAddr)
	// team-a's image is cached from its real registry.
	mustGet(t, c.url(origin.Addr, "/v2/team-a/app/manifests/v1"), map[string]string{"Accept": acceptManifests}, 200)
	for _, d := range append([]string{img.Config}, img.Layers...) {
		mustGet(t, c.url(origin.Addr, "/v2/team-a/app/blobs/"+d), nil, 200)
	}
	c.settle(t)
	// The liar's manifest, listing those layers, is served and cached for the liar.
	if _, body := mustGet(t, c.url(liarAddr, "/v2/team-a/app/manifests/v1"), map[string]string{"Accept": acceptManifests}, 200); string(body) != string(lie) {
		t.Fatal("liar's manifest")
	}
	// Neither the real manifest nor any real blob comes out under the liar's name.
	if resp, body, _ := do(t, http.MethodGet, c.url(liarAddr, "/v2/team-a/app/manifests/"+img.Digest), map[string]string{"Accept": acceptManifests}); resp != nil && sha(body) == img.Digest {
		t.Fatal("the real manifest was served for the liar")
	}
	for _, d := range append([]string{img.Config}, img.Layers...) {
		_, body, _ := do(t, http.MethodGet, c.url(liarAddr, "/v2/team-a/app/blobs/"+d), nil)
		if sha(body) == d {
			t.Fatalf("cached blob %s served for the lying registry", d)
		}
	}
	if liarBlobGETs.Load() == 0 {
		t.Fatal("the liar was never asked: its blob requests were answered from the cache")
	}
}

// The origin's 401 to a credential is remembered as briefly as an allowance: containerd's
// anonymous first request of every pull is answered with the origin's own challenge
// without a round trip, and after the TTL the origin is asked again.
func TestChallengeRemembered(t *testing.T) {
	origin := peers.StartRegistry(t, peers.WithHtpasswd("alice", "pw-alice"))
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 1024, peers.WithPushAuth("alice", "pw-alice"))
	const ttl = 300 * time.Millisecond
	c := newCacheWith(t, func(cfg *server.Config) { cfg.AuthzTTL = ttl }, origin.Addr)
	alice := map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:pw-alice")), "Accept": acceptManifests}
	mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/"+img.Digest), alice, 200) // cached now

	before := len(origin.Requests())
	first, _ := mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/v1"), nil, 401)
	again, _ := mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/v1"), nil, 401)
	byDigest, _ := mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/"+img.Digest), nil, 401)
	if n := len(origin.Requests()) - before; n != 1 {
		t.Fatalf("anonymous requests reached the origin %d times within the TTL, want 1", n)
	}
	for _, r := range []*http.Response{again, byDigest} {
		if r.Header.Get("Www-Authenticate") != first.Header.Get("Www-Authenticate") || first.Header.Get("Www-Authenticate") == "" {
			t.Fatalf("remembered challenge %q differs from the origin's %q", r.Header.Get("Www-Authenticate"), first.Header.Get("Www-Authenticate"))
		}
	}
	// Alice is not affected by the anonymous refusal.
	mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/v1"), alice, 200)
	time.Sleep(ttl + 50*time.Millisecond)
	before = len(origin.Requests())
	mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/v1"), nil, 401)
	if n := len(origin.Requests()) - before; n != 1 {
		t.Fatalf("after the TTL the origin was asked %d times, want 1", n)
	}
}
