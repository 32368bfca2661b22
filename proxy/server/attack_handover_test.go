package server_test

import (
	"io"
	"net/http"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
)

// A pod or node on the cluster network calls a replica's peer endpoints as an attacker
// would: a leaving notice or a join-only request, unsigned, signed with a guessed
// secret, or with a genuine signature moved onto another notice. Every one is refused
// with 403 and changes nothing: the replica takes nobody as leaving, serves no join-only
// request, and routes the next miss to its owner as before. A genuine notice replayed
// after a later one changes nothing either.
func TestPeerHandoverAttacks(t *testing.T) {
	registry := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, registry.Addr, "team/handover-attack:v1", 1, 1<<20)
	rs := newReplicaSet(t, 2, registry.Addr, nil)
	d := img.Layers[0]
	ownerURL := cluster.Owner(rs.urls, d)
	target := rs.replicas[0] // the attacked replica
	if rs.urls[0] == ownerURL {
		target = rs.replicas[1]
	}
	claimed := ownerURL // the attacker claims the owner is leaving
	signer := func(secret string, at time.Time) *cluster.PeerAuth {
		a, err := cluster.NewPeerAuth([]byte(secret), cluster.WithNow(func() time.Time { return at }))
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	leavingURI := "/cove/peer/notice?state=leaving&until=" + strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	joinURI := "/v2/team/handover-attack/blobs/" + d + "?ns=" + url.QueryEscape(registry.Addr) + "&cove-join-only=1"
	send := func(method, uri string, a *cluster.PeerAuth, spoil func(*http.Request)) (int, string) {
		req, _ := http.NewRequest(method, target.http.URL+uri, nil)
		if a != nil {
			a.Sign(req, claimed)
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
		return resp.StatusCode, string(b)
	}
	now := time.Now()
	for name, tc := range map[string]struct {
		method, uri string
		a           *cluster.PeerAuth
		spoil       func(*http.Request)
	}{
		"unsigned notice":          {http.MethodPost, leavingURI, nil, nil},
		"notice, peer header only": {http.MethodPost, leavingURI, nil, func(r *http.Request) { r.Header.Set(cluster.HeaderPeer, claimed) }},
		"notice, guessed secret":   {http.MethodPost, leavingURI, signer("a guessed secret, long enough", now), nil},
		"notice, old signature":    {http.MethodPost, leavingURI, signer(testPeerSecret, now.Add(-2*time.Minute)), nil},
		"signature of a serving notice moved onto a leaving one": {http.MethodPost, "/cove/peer/notice?state=serving", signer(testPeerSecret, now), func(r *http.Request) {
			r.URL, _ = url.Parse(target.http.URL + leavingURI)
		}},
		"unsigned join-only":        {http.MethodGet, joinURI, nil, nil},
		"join-only, guessed secret": {http.MethodGet, joinURI, signer("a guessed secret, long enough", now), nil},
		"join-only, signature of the plain request": {http.MethodGet, "/v2/team/handover-attack/blobs/" + d + "?ns=" + url.QueryEscape(registry.Addr), signer(testPeerSecret, now), func(r *http.Request) {
			r.URL, _ = url.Parse(target.http.URL + joinURI)
		}},
	} {
		status, body := send(tc.method, tc.uri, tc.a, tc.spoil)
		if status != http.StatusForbidden {
			t.Errorf("%s: %d %q, want 403", name, status, body)
		}
	}
	if n := gaugeMetric(t, target, "cove_peer_leaving"); n != 0 {
		t.Errorf("after the attacks the replica takes %v replicas as leaving, want 0", n)
	}
	if n := peerMetric(t, target, "cove_peer_notices_total", ""); n != 0 {
		t.Errorf("notices counted after the attacks = %v, want 0", n)
	}
	if n := peerMetric(t, target, "cove_peer_handover_served_total", ""); n != 0 {
		t.Errorf("join-only requests served after the attacks = %v, want 0", n)
	}
	if gets := registry.BlobGETs(); gets[d] != 0 {
		t.Errorf("the attacks made the origin send the blob %d times", gets[d])
	}
	// Routing is unchanged: the miss goes to its owner, which fills it.
	_, body := mustGet(t, target.url(registry.Addr, "/v2/team/handover-attack/blobs/"+d), nil, http.StatusOK)
	if sha(body) != d {
		t.Fatal("wrong bytes after the attacks")
	}
	if n := peerMetric(t, target, "cove_peer_forwarded_total", "owner"); n != 1 {
		t.Errorf("misses forwarded to the owner after the attacks = %v, want 1", n)
	}
	if n := peerMetric(t, target, "cove_peer_handover_total", ""); n != 0 {
		t.Errorf("handovers offered after the attacks = %v, want 0", n)
	}

	// A genuine leaving notice, then a later serving one, then the leaving one replayed.
	leaving := signer(testPeerSecret, now)
	if status, body := send(http.MethodPost, leavingURI, leaving, nil); status != http.StatusNoContent {
		t.Fatalf("genuine leaving notice: %d %s", status, body)
	}
	if n := gaugeMetric(t, target, "cove_peer_leaving"); n != 1 {
		t.Fatalf("after a genuine leaving notice: %v leaving, want 1", n)
	}
	if status, body := send(http.MethodPost, "/cove/peer/notice?state=serving", signer(testPeerSecret, now.Add(time.Second)), nil); status != http.StatusNoContent {
		t.Fatalf("genuine serving notice: %d %s", status, body)
	}
	if status, _ := send(http.MethodPost, leavingURI, leaving, nil); status != http.StatusNoContent {
		t.Fatalf("replayed leaving notice: %d", status)
	}
	if n := gaugeMetric(t, target, "cove_peer_leaving"); n != 0 {
		t.Errorf("a replayed leaving notice took effect: %v leaving, want 0", n)
	}
	if n := peerMetric(t, target, "cove_peer_notices_total", "stale"); n != 1 {
		t.Errorf("stale notices = %v, want 1", n)
	}
}
