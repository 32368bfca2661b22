package server_test

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/server"
	"github.com/cove-oci/cove/proxy/storage/filesystem"
)

const testPeerSecret = "peer-secret-for-the-server-tests"

// replicaSet is n Servers on one shared store, each on its own loopback listener, with
// a static membership of all of them.
type replicaSet struct {
	store    *countingStore
	replicas []*cache
	urls     []string
}

func newReplicaSet(t *testing.T, n int, origin string, configure func(*server.Config)) *replicaSet {
	t.Helper()
	return newReplicaSetOn(t, n, origin, configure, nil)
}

// newReplicaSetOn is newReplicaSet with the membership members makes of the replicas'
// URLs (nil: a static list of all of them).
func newReplicaSetOn(t *testing.T, n int, origin string, configure func(*server.Config), members func(urls []string) cluster.Membership) *replicaSet {
	t.Helper()
	fs, err := filesystem.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	store := &countingStore{Driver: fs, stores: map[digest.Digest]int{}}
	rs := &replicaSet{store: store}
	var servers []*httptest.Server
	for range n {
		hs := httptest.NewUnstartedServer(nil)
		servers = append(servers, hs)
		rs.urls = append(rs.urls, "http://"+hs.Listener.Addr().String())
	}
	var membership cluster.Membership
	if members != nil {
		membership = members(rs.urls)
	} else if membership, err = cluster.NewStatic(rs.urls); err != nil {
		t.Fatal(err)
	}
	for i, hs := range servers {
		cfg := server.Config{
			Storage:      store,
			SpoolDir:     filepath.Join(t.TempDir(), "spool"),
			PlainHTTP:    []string{origin},
			StallTimeout: 5 * time.Second,
			Cluster:      &server.ClusterConfig{Membership: membership, Self: rs.urls[i], Secret: []byte(testPeerSecret), DownFor: time.Minute},
		}
		if configure != nil {
			configure(&cfg)
		}
		srv, err := server.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		hs.Config.Handler = srv
		hs.Start()
		t.Cleanup(hs.Close)
		rs.replicas = append(rs.replicas, &cache{srv: srv, http: hs, store: fs})
	}
	return rs
}

// nonOwner returns a replica that does not own d, and d's owner.
func (rs *replicaSet) nonOwner(d string) (asker, owner *cache) {
	o := cluster.Owner(rs.urls, d)
	for i, u := range rs.urls {
		if u == o {
			owner = rs.replicas[i]
		} else if asker == nil {
			asker = rs.replicas[i]
		}
	}
	return asker, owner
}

// Every replica asked for every blob at once: the origin sends each blob once, every
// answer is the blob, and the misses of non-owners went through their owner.
func TestPeerOneOriginFetchAcrossReplicas(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/peer:v1", 3, 2<<20)
	rs := newReplicaSet(t, 3, origin.Addr, nil)
	blobs := append([]string{img.Config}, img.Layers...)
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for _, d := range blobs {
		for _, c := range rs.replicas {
			for range 2 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					resp, body, err := do(t, http.MethodGet, c.url(origin.Addr, "/v2/team/peer/blobs/"+d), nil)
					switch {
					case err != nil:
						errs <- err
					case resp.StatusCode != http.StatusOK:
						errs <- fmt.Errorf("GET %s: %d %s", d, resp.StatusCode, body)
					case sha(body) != d:
						errs <- fmt.Errorf("GET %s: body of digest %s", d, sha(body))
					}
				}()
			}
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	gets := origin.BlobGETs()
	for _, d := range blobs {
		if gets[d] != 1 {
			t.Errorf("origin GETs of %s = %d, want 1", d, gets[d])
		}
	}
	var forwarded, accepted float64
	for _, c := range rs.replicas {
		forwarded += peerMetric(t, c, "cove_peer_forwarded_total", "owner")
		accepted += peerMetric(t, c, "cove_peer_requests_total", "accepted")
	}
	if forwarded == 0 || accepted == 0 {
		t.Errorf("forwarded %v misses and accepted %v peer requests: the replicas did not use the peer path", forwarded, accepted)
	}
	for _, c := range rs.replicas {
		c.settle(t)
	}
	for _, d := range blobs {
		if n := rs.store.count(digest.Digest(d)); n != 1 {
			t.Errorf("%s stored %d times in the shared store, want once", d, n)
		}
	}
	// Now a hit on every replica, from the shared store.
	for _, c := range rs.replicas {
		_, body := mustGet(t, c.url(origin.Addr, "/v2/team/peer/blobs/"+img.Layers[0]), nil, http.StatusOK)
		if sha(body) != img.Layers[0] {
			t.Fatal("a hit served the wrong bytes")
		}
	}
	if gets := origin.BlobGETs(); gets[img.Layers[0]] != 1 {
		t.Errorf("origin GETs of a stored blob after hits = %d, want 1", gets[img.Layers[0]])
	}
}

func peerMetric(t *testing.T, c *cache, name, label string) float64 {
	t.Helper()
	mfs, err := c.srv.Metrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := label == ""
			for _, l := range m.GetLabel() {
				match = match || l.GetValue() == label
			}
			if match {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// An owner that is down is routed around: the asking replica's request succeeds (from
// the origin, as the next in rank, or from the next replica), once per blob, and the
// outage is counted.
func TestPeerOwnerDownRoutedAround(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/down:v1", 1, 1<<20)
	rs := newReplicaSet(t, 3, origin.Addr, nil)
	d := img.Layers[0]
	asker, owner := rs.nonOwner(d)
	owner.http.Close()
	_, body := mustGet(t, asker.url(origin.Addr, "/v2/team/down/blobs/"+d), nil, http.StatusOK)
	if sha(body) != d {
		t.Fatal("wrong bytes with the owner down")
	}
	if n := peerMetric(t, asker, "cove_peer_owner_down_total", ""); n != 1 {
		t.Errorf("owner-down events = %v, want 1", n)
	}
	if gets := origin.BlobGETs(); gets[d] != 1 {
		t.Errorf("origin GETs = %d, want 1", gets[d])
	}
	// Stored once, by whoever fetched it: the next replica has a hit.
	for _, c := range rs.replicas {
		c.settle(t)
	}
	// A peer fill that went to the origin stores after its client's last byte: wait.
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, err = rs.store.Stat(t.Context(), digest.Digest(d)); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("the blob was not stored after the owner was routed around: %v", err)
	}
	if n := rs.store.count(digest.Digest(d)); n != 1 {
		t.Errorf("stored %d times, want once", n)
	}
}

// A peer request that fails verification is refused with 403 and never gets the blob,
// even a cached one; a valid peer request without the client's credential gets the
// origin's own 401, not the blob.
func TestPeerRequestAttacks(t *testing.T) {
	origin := peers.StartRegistry(t, peers.WithHtpasswd("alice", "secret-a"))
	img := peers.PushRandomImage(t, origin.Addr, "team/private:v1", 1, 1<<20, peers.WithPushAuth("alice", "secret-a"))
	rs := newReplicaSet(t, 2, origin.Addr, nil)
	d := img.Layers[0]
	alice := "Basic " + basic("alice", "secret-a")
	target := rs.replicas[0]
	path := "/v2/team/private/blobs/" + d + "?ns=" + origin.Addr
	// Cache the blob first: the attacks must not get it from the store either.
	_, body := mustGet(t, target.http.URL+path, map[string]string{"Authorization": alice}, http.StatusOK)
	if sha(body) != d {
		t.Fatal("wrong bytes")
	}
	for _, c := range rs.replicas {
		c.settle(t)
	}
	now := time.Now()
	signer := func(secret string, at time.Time) *cluster.PeerAuth {
		a, err := cluster.NewPeerAuth([]byte(secret), cluster.WithNow(func() time.Time { return at }))
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	send := func(a *cluster.PeerAuth, auth string, spoil func(*http.Request)) (*http.Response, string) {
		req, _ := http.NewRequest(http.MethodGet, target.http.URL+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		if a != nil {
			a.Sign(req, rs.urls[1])
		}
		if spoil != nil {
			spoil(req)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	for name, tc := range map[string]struct {
		a     *cluster.PeerAuth
		auth  string
		spoil func(*http.Request)
	}{
		"headers without signature": {nil, alice, func(r *http.Request) { r.Header.Set(cluster.HeaderPeer, rs.urls[1]) }},
		"wrong secret":              {signer("a guessed secret, long enough", now), alice, nil},
		"replayed old signature":    {signer(testPeerSecret, now.Add(-2*time.Minute)), alice, nil},
		"signature for another credential": {signer(testPeerSecret, now), "Basic " + basic("mallory", "x"), func(r *http.Request) {
			r.Header.Set("Authorization", alice)
		}},
	} {
		resp, body := send(tc.a, tc.auth, tc.spoil)
		if resp.StatusCode != http.StatusForbidden || strings.Contains(body, "sha256") && sha([]byte(body)) == d {
			t.Errorf("%s: %d %q, want 403", name, resp.StatusCode, body)
		}
	}
	if n := peerMetric(t, target, "cove_peer_requests_total", "rejected"); n != 4 {
		t.Errorf("rejected peer requests = %v, want 4", n)
	}
	// A valid peer request with no credential, or a wrong one: the origin decides.
	for _, auth := range []string{"", "Basic " + basic("alice", "wrong")} {
		resp, body := send(signer(testPeerSecret, now), auth, nil)
		if resp.StatusCode != http.StatusUnauthorized || sha([]byte(body)) == d {
			t.Errorf("peer request with credential %q: %d, want the origin's 401", auth, resp.StatusCode)
		}
		if !strings.Contains(resp.Header.Get("Www-Authenticate"), "Basic") {
			t.Errorf("peer request with credential %q: challenge %q, want the origin's", auth, resp.Header.Get("Www-Authenticate"))
		}
	}
	// The genuine article works.
	resp, body2 := send(signer(testPeerSecret, now), alice, nil)
	if resp.StatusCode != http.StatusOK || sha([]byte(body2)) != d {
		t.Errorf("a valid peer request with alice's credential: %d", resp.StatusCode)
	}
}

// A cove-cache without peers refuses every peer request.
func TestPeerRequestToSingleReplicaRefused(t *testing.T) {
	origin := peers.StartRegistry(t)
	c := newCache(t, origin.Addr)
	a, _ := cluster.NewPeerAuth([]byte(testPeerSecret))
	req, _ := http.NewRequest(http.MethodGet, c.url(origin.Addr, "/v2/"), nil)
	a.Sign(req, "http://127.0.0.1:1")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Fatalf("peer request to a single cove-cache: %d, want 403", resp.StatusCode)
	}
}

func basic(user, password string) string {
	return base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
}

// countingStore counts how many times each blob is written to the shared store.
type countingStore struct {
	*filesystem.Driver
	mu     sync.Mutex
	stores map[digest.Digest]int
}

func (c *countingStore) Put(ctx context.Context, d digest.Digest, size int64, r io.Reader) error {
	c.add(d)
	return c.Driver.Put(ctx, d, size, r)
}

func (c *countingStore) AdoptFile(ctx context.Context, d digest.Digest, size int64, path string) error {
	c.add(d)
	return c.Driver.AdoptFile(ctx, d, size, path)
}

func (c *countingStore) add(d digest.Digest) {
	c.mu.Lock()
	c.stores[d]++
	c.mu.Unlock()
}

func (c *countingStore) count(d digest.Digest) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stores[d]
}

// Replicas given different secrets (a misconfiguration, or a rotation half done): the
// owner refuses the peer request, and the asking replica routes around it to the origin
// instead of relaying a 403 its client did not earn.
func TestPeerSecretMismatchRoutedAround(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/mismatch:v1", 1, 1<<20)
	n := 0
	rs := newReplicaSet(t, 2, origin.Addr, func(cfg *server.Config) {
		if n++; n == 2 {
			cfg.Cluster.Secret = []byte("another secret, of the other replica")
		}
	})
	d := img.Layers[0]
	asker, owner := rs.nonOwner(d)
	_, body := mustGet(t, asker.url(origin.Addr, "/v2/team/mismatch/blobs/"+d), nil, http.StatusOK)
	if sha(body) != d {
		t.Fatal("wrong bytes")
	}
	if got := peerMetric(t, owner, "cove_peer_requests_total", "rejected"); got != 1 {
		t.Errorf("the owner rejected %v peer requests, want 1", got)
	}
	if got := peerMetric(t, asker, "cove_peer_forwarded_total", "origin"); got != 1 {
		t.Errorf("the asker fetched %v times from the origin, want 1", got)
	}
	if got := peerMetric(t, asker, "cove_peer_owner_down_total", ""); got != 1 {
		t.Errorf("owner-down events = %v, want 1", got)
	}
}
