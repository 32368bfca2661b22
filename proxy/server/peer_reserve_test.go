package server_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
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
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/evict"
	"github.com/cove-oci/cove/proxy/fill"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/server"
	"github.com/cove-oci/cove/proxy/storage/s3"
)

// Reservations on the peer path: three replicas on one bucket of a real S3 server, each
// a Server over a bounded evict.Store with shared eviction, wired as cove-cache wires
// them (the store decides the others' reservations while it leads; the server's link
// takes a follower's to the leader).

type boundedReplica struct {
	url   string
	srv   *server.Server
	http  *httptest.Server
	store *evict.Store
	m     *metrics.Store
}

type boundedSet struct {
	replicas []*boundedReplica
	urls     []string
}

var reserveBuckets atomic.Int64

func newBoundedSet(t *testing.T, max int64, origin string, grants bool) *boundedSet {
	t.Helper()
	m := peers.StartMinIO(t)
	m.SetEnv(t)
	t.Setenv("AWS_SESSION_TOKEN", "")
	t.Setenv("AWS_PROFILE", "")
	bucket := fmt.Sprintf("reserve%d", reserveBuckets.Add(1))
	if err := m.MakeBucket(context.Background(), bucket); err != nil {
		t.Fatal(err)
	}
	bs := &boundedSet{}
	var listeners []*httptest.Server
	for range 3 {
		hs := httptest.NewUnstartedServer(nil)
		listeners = append(listeners, hs)
		bs.urls = append(bs.urls, "http://"+hs.Listener.Addr().String())
	}
	membership, err := cluster.NewStatic(bs.urls)
	if err != nil {
		t.Fatal(err)
	}
	for i, hs := range listeners {
		d, err := s3.New(context.Background(), s3.Config{Endpoint: m.Endpoint, Bucket: bucket})
		if err != nil {
			t.Fatal(err)
		}
		r := &boundedReplica{url: bs.urls[i], http: hs, m: metrics.NewStore()}
		r.store, err = evict.New(d, evict.Config{MaxSize: max, Metrics: r.m, Logger: slog.New(slog.DiscardHandler),
			Shared: &evict.Shared{Self: r.url, Members: membership.Members, SyncInterval: 300 * time.Millisecond, StaleAfter: 20 * time.Second}})
		if err != nil {
			t.Fatal(err)
		}
		r.store.Start(context.Background())
		cfg := &server.ClusterConfig{Membership: membership, Self: r.url, Secret: []byte(testPeerSecret), DownFor: time.Minute}
		if grants {
			cfg.Reservations = r.store
		}
		r.srv, err = server.New(server.Config{Storage: r.store, Reserve: r.store.Reserve, SpoolDir: filepath.Join(t.TempDir(), "spool"),
			PlainHTTP: []string{origin}, StallTimeout: 5 * time.Second, Cluster: cfg})
		if err != nil {
			t.Fatal(err)
		}
		r.store.SetLeaderLink(r.srv.ReservationLink())
		hs.Config.Handler = r.srv
		hs.Start()
		t.Cleanup(func() {
			hs.Close()
			r.store.Close(context.Background())
		})
		bs.replicas = append(bs.replicas, r)
	}
	return bs
}

// agreedLeader waits until every replica names the same leader, and returns it and the
// followers.
func (bs *boundedSet) agreedLeader(t *testing.T) (*boundedReplica, []*boundedReplica) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		var leader *boundedReplica
		var rest []*boundedReplica
		agreed := true
		for _, r := range bs.replicas {
			if r.store.IsLeader() {
				if leader != nil {
					agreed = false
				}
				leader = r
			} else {
				rest = append(rest, r)
			}
		}
		if !agreed || leader == nil {
			continue
		}
		for _, r := range rest {
			if r.store.Leader() != leader.url {
				agreed = false
			}
		}
		if agreed {
			return leader, rest
		}
	}
	t.Fatal("the replicas did not agree on an eviction leader")
	return nil, nil
}

func reservationsOf(r *boundedReplica, result string) float64 {
	return testutil.ToFloat64(r.m.SharedReservations.WithLabelValues(result))
}

func reserveKey(s string) fill.Key {
	return fill.Key{Registry: "reg.example", Digest: digest.FromString(s)}
}

// Fills starting at once on two followers, over the real peer path: the leader grants
// exactly the room the bound leaves, and nobody falls back.
func TestPeerReservationsAtOnceStayWithinTheBound(t *testing.T) {
	const max, size = 4 << 20, 512 << 10
	bs := newBoundedSet(t, max, "127.0.0.1:1", true)
	leader, rest := bs.agreedLeader(t)
	cost := int64(size + 8<<10) // the blob in 4 KiB blocks and its record
	room := max - leader.store.Used()
	var granted, refused atomic.Int64
	var mu sync.Mutex
	var releases []func(bool)
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rel, err := rest[i%2].store.Reserve(context.Background(), reserveKey(fmt.Sprint("at-once-", i)), size)
			switch {
			case err == nil:
				granted.Add(1)
				mu.Lock()
				releases = append(releases, rel)
				mu.Unlock()
			case errdefs.IsResourceExhausted(err):
				refused.Add(1)
			default:
				t.Errorf("reservation %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	t.Logf("granted %d, refused %d; room %d, cost %d", granted.Load(), refused.Load(), room, cost)
	if granted.Load()*cost > room {
		t.Fatalf("the followers hold %d bytes, past the %d the bound left", granted.Load()*cost, room)
	}
	if (granted.Load()+1)*cost <= room {
		t.Fatalf("granted %d of 16: room for one more was refused", granted.Load())
	}
	if got := reservationsOf(leader, "granted"); got != float64(granted.Load()) {
		t.Fatalf("the leader counted %v grants, the followers hold %d", got, granted.Load())
	}
	for _, r := range rest {
		if got := reservationsOf(r, "fallback"); got != 0 {
			t.Fatalf("%s fell back %v times with the leader up", r.url, got)
		}
	}
	if used := leader.store.Used(); used > max {
		t.Fatalf("the leader counts %d bytes, past the bound of %d", used, max)
	}
	for _, rel := range releases {
		rel(false)
	}
	waitUntil(t, "the grants came back", func() bool { return leader.store.Used() < cost })
}

// A real fill on a follower that owns the blob reserves at the leader, and the stored
// blob is counted there when the grant comes back.
func TestPeerReservationOfAFill(t *testing.T) {
	origin := peers.StartRegistry(t)
	bs := newBoundedSet(t, 64<<20, origin.Addr, true)
	leader, _ := bs.agreedLeader(t)
	var img peers.Image
	var owner *boundedReplica
	for i := 0; owner == nil; i++ {
		if i == 12 {
			t.Fatal("no layer owned by a follower in 12 images")
		}
		img = peers.PushRandomImage(t, origin.Addr, fmt.Sprintf("team/app:v%d", i), 1, 1<<20)
		for _, r := range bs.replicas {
			if r != leader && r.url == cluster.Owner(bs.urls, img.Layers[0]) {
				owner = r
			}
		}
	}
	d := img.Layers[0]
	_, body := mustGet(t, owner.http.URL+"/v2/team/app/blobs/"+d+"?ns="+origin.Addr, nil, http.StatusOK)
	if sha(body) != d {
		t.Fatal("wrong bytes")
	}
	if got := reservationsOf(leader, "granted"); got < 1 {
		t.Fatalf("the leader granted %v reservations for a fill on %s", got, owner.url)
	}
	waitUntil(t, "the stored blob counted by the leader", func() bool { return leader.store.Used() >= 1<<20 })
}

// With the leader unreachable, a follower reserves on the records' estimate: the fill
// is never held up or failed by the leader's absence.
func TestPeerReservationLeaderDownFallsBack(t *testing.T) {
	bs := newBoundedSet(t, 64<<20, "127.0.0.1:1", true)
	leader, rest := bs.agreedLeader(t)
	leader.http.CloseClientConnections()
	leader.http.Listener.Close()
	for i := range 3 {
		rel, err := rest[0].store.Reserve(context.Background(), reserveKey(fmt.Sprint("down-", i)), 1<<20)
		if err != nil {
			t.Fatalf("reservation %d with the leader down: %v", i, err)
		}
		rel(false)
	}
	if got := reservationsOf(rest[0], "fallback"); got != 3 {
		t.Fatalf("fallbacks = %v, want 3", got)
	}
}

// The reservation endpoints as an attacker on the cluster network sees them: every
// request that is not a member's own, signed with the secret, is refused, and a member
// can neither end another's grant nor replay one it released.
func TestPeerReservationAttacks(t *testing.T) {
	bs := newBoundedSet(t, 4<<20, "127.0.0.1:1", true)
	leader, rest := bs.agreedLeader(t)
	a, b := rest[0], rest[1]
	d := digest.FromString("attack")
	post := func(to *boundedReplica, path string, q url.Values, sign func(*http.Request)) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, to.url+path+"?"+q.Encode(), nil)
		if sign != nil {
			sign(req)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	as := func(secret, member string) func(*http.Request) {
		auth, err := cluster.NewPeerAuth([]byte(secret))
		if err != nil {
			t.Fatal(err)
		}
		return func(r *http.Request) { auth.Sign(r, member) }
	}
	reserve := func(seq string, cost int64) url.Values {
		return url.Values{"seq": {seq}, "digest": {d.String()}, "cost": {fmt.Sprint(cost)}}
	}
	// Seqs above any a replica numbers its own with (they start at the wall clock in ns).
	const seqA, seqB = "18000000000000000000", "17000000000000000000"
	for name, c := range map[string]struct {
		to   *boundedReplica
		q    url.Values
		sign func(*http.Request)
		want int
	}{
		"unsigned":                  {leader, reserve(seqA, 1<<20), func(r *http.Request) { r.Header.Set(cluster.HeaderPeer, a.url) }, http.StatusForbidden},
		"no peer headers at all":    {leader, reserve(seqA, 1<<20), nil, http.StatusForbidden},
		"a guessed secret":          {leader, reserve(seqA, 1<<20), as("a guessed secret, long enough", a.url), http.StatusForbidden},
		"signed as a non-member":    {leader, reserve(seqA, 1<<20), as(testPeerSecret, "http://127.0.0.1:9"), http.StatusForbidden},
		"signed as the leader":      {leader, reserve(seqA, 1<<20), as(testPeerSecret, leader.url), http.StatusForbidden},
		"at a follower":             {b, reserve(seqA, 1<<20), as(testPeerSecret, a.url), http.StatusPreconditionFailed},
		"no seq":                    {leader, url.Values{"digest": {d.String()}, "cost": {"5"}}, as(testPeerSecret, a.url), http.StatusBadRequest},
		"a bad digest":              {leader, url.Values{"seq": {"5"}, "digest": {"sha256:zz"}, "cost": {"5"}}, as(testPeerSecret, a.url), http.StatusBadRequest},
		"a negative cost":           {leader, reserve(seqA, -1), as(testPeerSecret, a.url), http.StatusBadRequest},
		"past the bound":            {leader, reserve(seqA, 8<<20), as(testPeerSecret, a.url), http.StatusTooManyRequests},
		"a release of nothing held": {leader, url.Values{"seq": {"12"}, "digest": {d.String()}}, as(testPeerSecret, a.url), http.StatusPreconditionFailed},
		"a stored release, no size": {leader, url.Values{"seq": {"12"}, "digest": {d.String()}, "stored": {"1"}}, as(testPeerSecret, a.url), http.StatusBadRequest},
	} {
		path := "/cove/peer/reserve"
		if !c.q.Has("cost") {
			path = "/cove/peer/release"
		}
		if got, body := post(c.to, path, c.q, c.sign); got != c.want {
			t.Errorf("%s: %d %s, want %d", name, got, body, c.want)
		}
	}
	if used := leader.store.Used(); used >= 1<<20 {
		t.Fatalf("the refused requests took room: the leader counts %d bytes", used)
	}
	// a's genuine grant; b cannot release it, a's retried release is harmless, and a
	// replay of the reservation after the release is refused.
	if got, body := post(leader, "/cove/peer/reserve", reserve(seqA, 1<<20), as(testPeerSecret, a.url)); got != http.StatusNoContent {
		t.Fatalf("a's reservation: %d %s", got, body)
	}
	if got, _ := post(leader, "/cove/peer/reserve", reserve(seqA, 1<<20), as(testPeerSecret, a.url)); got != http.StatusNoContent {
		t.Fatalf("a's reservation retried: %d", got)
	}
	release := url.Values{"seq": {seqA}, "digest": {d.String()}}
	if got, _ := post(leader, "/cove/peer/release", release, as(testPeerSecret, b.url)); got != http.StatusPreconditionFailed {
		t.Fatalf("b released a's grant: %d", got)
	}
	if used := leader.store.Used(); used < 1<<20 {
		t.Fatalf("a's grant ended by b: the leader counts %d bytes", used)
	}
	for range 2 {
		if got, _ := post(leader, "/cove/peer/release", release, as(testPeerSecret, a.url)); got != http.StatusNoContent {
			t.Fatalf("a's release: %d", got)
		}
	}
	if got, _ := post(leader, "/cove/peer/reserve", reserve(seqA, 1<<20), as(testPeerSecret, a.url)); got != http.StatusPreconditionFailed {
		t.Fatalf("a's reservation replayed after its release: %d", got)
	}
	if got, _ := post(leader, "/cove/peer/reserve", reserve(seqB, 1<<20), as(testPeerSecret, b.url)); got != http.StatusNoContent {
		t.Fatalf("b's genuine reservation: %d", got)
	}
}

// Replicas that keep no shared bound answer 501, which a follower's link reports as
// NotImplemented (and its store then reserves on its own estimate); a cove-cache without
// peers has no link at all.
func TestPeerReservationWithoutSharedBound(t *testing.T) {
	bs := newBoundedSet(t, 4<<20, "127.0.0.1:1", false)
	leader, rest := bs.agreedLeader(t)
	link := rest[0].srv.ReservationLink()
	err := link.Reserve(context.Background(), leader.url, 5, digest.FromString("x"), 1<<20)
	if !errdefs.IsNotImplemented(err) || !strings.Contains(err.Error(), "501") {
		t.Fatalf("reserve at a replica without grants: %v, want not implemented (501)", err)
	}
	if _, err := rest[0].store.Reserve(context.Background(), reserveKey("estimate"), 1<<20); err != nil {
		t.Fatalf("a follower could not reserve on its estimate: %v", err)
	}
	if got := reservationsOf(rest[0], "fallback"); got != 1 {
		t.Fatalf("fallbacks = %v, want 1", got)
	}
	origin := peers.StartRegistry(t)
	if newCache(t, origin.Addr).srv.ReservationLink() != nil {
		t.Fatal("a cove-cache without peers has a reservation link")
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}
