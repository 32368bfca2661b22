package server_test

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/server"
)

// gaugeMetric reads a gauge of c.
func gaugeMetric(t *testing.T, c *cache, name string) float64 {
	t.Helper()
	mfs, err := c.srv.Metrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no gauge %s", name)
	return 0
}

// ownedBy returns up to n blobs of fresh images pushed to origin (small layers) whose
// first member in rank over urls is owner.
func ownedBy(t *testing.T, origin, repo string, urls []string, owner string, n int) []string {
	t.Helper()
	var out []string
	for i := 0; len(out) < n && i < 10; i++ {
		img := peers.PushRandomImage(t, origin, fmt.Sprintf("%s:v%d", repo, i), 6, 256<<10)
		for _, d := range append([]string{img.Config}, img.Layers...) {
			if cluster.Owner(urls, d) == owner && len(out) < n {
				out = append(out, d)
			}
		}
	}
	if len(out) < n {
		t.Fatalf("no %d blobs owned by %s", n, owner)
	}
	return out
}

func (rs *replicaSet) replica(url string) *cache {
	return rs.replicas[slices.Index(rs.urls, url)]
}

// The owner of a blob drains mid-fill and tells the others, and the membership drops it
// at once (its EndpointSlice endpoint turned not ready): a replica asked for the blob
// now streams it from the leaving replica's fill (join-only), so the origin sends it
// once; a blob the leaving replica is not filling is filled by the next owner, never by
// it; and the leaving replica forwards its own clients' misses to the next owner.
func TestPeerHandoverJoinsLeavingFill(t *testing.T) {
	registry := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, registry.Addr, "team/handover:v1", 1, 6<<20)
	slow := peers.StartRateLimitProxy(t, registry.Addr, 2<<20) // 3 s for the layer
	var members *changingMembership
	rs := newReplicaSetOn(t, 3, slow.Addr, nil, func(urls []string) cluster.Membership {
		members = &changingMembership{members: urls, changed: make(chan struct{})}
		return members
	})
	x := img.Layers[0]
	leaverURL := cluster.Owner(rs.urls, x)
	leaver := rs.replica(leaverURL)
	cold := ownedBy(t, registry.Addr, "team/handover-cold", rs.urls, leaverURL, 3)
	var stay []string
	for _, u := range rs.urls {
		if u != leaverURL {
			stay = append(stay, u)
		}
	}
	asker := rs.replica(stay[0])

	type result struct {
		status int
		sum    string
		err    error
	}
	first := make(chan result, 1)
	go func() {
		resp, body, err := do(t, http.MethodGet, leaver.url(slow.Addr, "/v2/team/handover/blobs/"+x), nil)
		if err != nil {
			first <- result{err: err}
			return
		}
		first <- result{status: resp.StatusCode, sum: sha(body)}
	}()
	for deadline := time.Now().Add(30 * time.Second); peerMetric(t, leaver, "cove_origin_bytes_total", "") < 1<<20; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the owner's fill did not start")
		}
	}
	leaver.srv.Drain("test")
	if told := leaver.srv.AnnounceLeaving(t.Context(), time.Minute); told != 2 {
		t.Fatalf("the leaving replica told %d replicas, want 2", told)
	}
	members.set(stay)
	for _, u := range stay {
		if n := gaugeMetric(t, rs.replica(u), "cove_peer_leaving"); n != 1 {
			t.Fatalf("%s sees %v replicas leaving, want 1", u, n)
		}
	}

	// During its grace, its own client's cold miss: forwarded to a replica that stays.
	before := peerMetric(t, leaver, "cove_peer_forwarded_total", "owner")
	_, body := mustGet(t, leaver.url(slow.Addr, "/v2/team/handover-cold/blobs/"+cold[1]), nil, http.StatusOK)
	if sha(body) != cold[1] {
		t.Fatal("wrong bytes of the leaving replica's own miss")
	}
	if n := peerMetric(t, leaver, "cove_peer_forwarded_total", "owner") - before; n != 1 {
		t.Errorf("the leaving replica forwarded %v of its own misses to an owner, want 1", n)
	}

	// Its grace is over: it serves only the replicas joining its fill.
	if !leaver.srv.CloseToClients() {
		t.Fatal("CloseToClients does not apply to a draining replica of several")
	}
	resp, _ := mustGet(t, leaver.url(slow.Addr, "/v2/team/handover-cold/blobs/"+cold[2]), nil, http.StatusServiceUnavailable)
	if resp.Header.Get("Cove-Peer-Leaving") == "" {
		t.Error("a client's request after the grace: 503 without Cove-Peer-Leaving")
	}

	// The blob in flight on the leaving replica: joined, not fetched again.
	_, body = mustGet(t, asker.url(slow.Addr, "/v2/team/handover/blobs/"+x), nil, http.StatusOK)
	if sha(body) != x {
		t.Fatal("wrong bytes through the handover")
	}
	if n := peerMetric(t, asker, "cove_peer_handover_total", "joined"); n != 1 {
		t.Errorf("handovers joined = %v, want 1", n)
	}
	if n := peerMetric(t, leaver, "cove_peer_handover_served_total", "joined"); n != 1 {
		t.Errorf("join-only requests the leaving replica served from its fill = %v, want 1", n)
	}
	if r := <-first; r.err != nil || r.status != http.StatusOK || r.sum != x {
		t.Fatalf("the leaving replica's own client: %+v", r)
	}

	// A cold blob it would have owned: offered, missed, filled by the next owner.
	_, body = mustGet(t, asker.url(slow.Addr, "/v2/team/handover-cold/blobs/"+cold[0]), nil, http.StatusOK)
	if sha(body) != cold[0] {
		t.Fatal("wrong bytes of a cold blob after the handover")
	}
	if n := peerMetric(t, asker, "cove_peer_handover_total", "missed"); n != 1 {
		t.Errorf("handovers missed = %v, want 1", n)
	}
	// A replica that missed the notice and still lists it (here: told, then told the
	// opposite by a validly signed serving notice; the membership lists it again)
	// forwards a miss to it as to an owner: the 503 marked leaving sends it to the next
	// owner at once.
	members.set(rs.urls)
	forged, _ := cluster.NewPeerAuth([]byte(testPeerSecret))
	req, _ := http.NewRequest(http.MethodPost, asker.http.URL+"/cove/peer/notice?state=serving", nil)
	forged.Sign(req, leaverURL)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusNoContent {
		t.Fatalf("serving notice: %v %v", resp, err)
	}
	downBefore := peerMetric(t, asker, "cove_peer_owner_down_total", "")
	_, body = mustGet(t, asker.url(slow.Addr, "/v2/team/handover-cold/blobs/"+cold[2]), nil, http.StatusOK)
	if sha(body) != cold[2] {
		t.Fatal("wrong bytes of a miss routed around the leaving replica")
	}
	if n := peerMetric(t, asker, "cove_peer_owner_down_total", "") - downBefore; n != 1 {
		t.Errorf("owner-down events after a leaving replica's 503 = %v, want 1", n)
	}
	for _, c := range rs.replicas {
		c.settle(t)
	}
	gets := registry.BlobGETs()
	for _, d := range []string{x, cold[0], cold[1], cold[2]} {
		if gets[d] != 1 {
			t.Errorf("origin GETs of %s = %d, want 1", d, gets[d])
		}
		if n := rs.store.count(digest.Digest(d)); n != 1 {
			t.Errorf("%s stored %d times, want once", d, n)
		}
	}
	if fills := histogramCount(t, leaver, "cove_fill_duration_seconds"); fills != 1 {
		t.Errorf("the leaving replica ran %v origin fills, want 1 (the one it had started)", fills)
	}
}

// histogramCount is the sample count of a histogram of c, over its label sets.
func histogramCount(t *testing.T, c *cache, name string) uint64 {
	t.Helper()
	mfs, err := c.srv.Metrics().Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				n += m.GetHistogram().GetSampleCount()
			}
		}
	}
	return n
}

// slowPeerBodies reads the bodies of peer GETs slowly, so a replica is still streaming a
// blob from its owner when the owner has stored it.
type slowPeerBodies struct{ base http.RoundTripper }

func (s slowPeerBodies) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := s.base.RoundTrip(r)
	if err == nil && r.Method == http.MethodGet {
		resp.Body = &slowBody{ReadCloser: resp.Body}
	}
	return resp, err
}

type slowBody struct{ io.ReadCloser }

func (b *slowBody) Read(p []byte) (int, error) {
	time.Sleep(20 * time.Millisecond) // 64 KiB per 20 ms: about 3 MiB/s
	return b.ReadCloser.Read(p[:min(len(p), 64<<10)])
}

// The owner stores a blob and goes (its drain's bound ends) while a replica is still
// streaming the blob from it: the replica resumes from the next owner, which reads the
// rest from the shared store, or, when it is the next owner itself, reads it from the
// store itself. The origin sends the blob once, the bucket holds it once.
func TestPeerResumeReadsWhatTheGoneOwnerStored(t *testing.T) {
	for _, next := range []string{"itself", "another replica"} {
		t.Run("next owner is "+next, func(t *testing.T) {
			registry := peers.StartRegistry(t)
			img := peers.PushRandomImage(t, registry.Addr, "team/handover-cut:v1", 1, 24<<20)
			d := img.Layers[0]
			rs := newReplicaSet(t, 3, registry.Addr, func(cfg *server.Config) {
				base := http.DefaultTransport.(*http.Transport).Clone()
				base.Proxy = nil
				cfg.Cluster.Transport = slowPeerBodies{base: base}
			})
			rank := cluster.Rank(rs.urls, d)
			owner := rs.replica(rank[0])
			asker := rs.replica(rank[1]) // next in rank after the owner: itself
			if next != "itself" {
				asker = rs.replica(rank[2]) // rank[1] takes over
			}
			type result struct {
				status int
				sum    string
				err    error
			}
			done := make(chan result, 1)
			go func() {
				resp, body, err := do(t, http.MethodGet, asker.url(registry.Addr, "/v2/team/handover-cut/blobs/"+d), nil)
				if err != nil {
					done <- result{err: err}
					return
				}
				done <- result{status: resp.StatusCode, sum: sha(body)}
			}()
			for deadline := time.Now().Add(30 * time.Second); rs.store.count(digest.Digest(d)) == 0; time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("the owner did not store the blob")
				}
			}
			owner.http.CloseClientConnections() // the drain's bound: the process exits
			owner.http.Close()
			r := <-done
			if r.err != nil || r.status != http.StatusOK || r.sum != d {
				t.Fatalf("the asking replica's client: %+v", r)
			}
			if n := peerMetric(t, asker, "cove_peer_resumes_total", "ranged"); n != 1 {
				t.Errorf("ranged resumes = %v, want 1 (the stream was not cut mid-body?)", n)
			}
			for _, c := range rs.replicas {
				c.settle(t)
			}
			if gets := registry.BlobGETs(); gets[d] != 1 {
				t.Errorf("origin GETs = %d, want 1", gets[d])
			}
			if n := rs.store.count(digest.Digest(d)); n != 1 {
				t.Errorf("stored %d times, want once", n)
			}
			if n := peerMetric(t, asker, "cove_peer_forwarded_total", "origin"); n != 0 {
				t.Errorf("the asking replica went to the origin %v times, want 0", n)
			}
		})
	}
}
