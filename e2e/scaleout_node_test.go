package e2e

import (
	"testing"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
)

// Three replicas on one bucket, three fresh containerds each through its own cove-node
// given all three replica URLs (each in another order: the order given does not
// matter). A cold pull of a multi-layer image: the origin sends each blob once, and no
// blob is forwarded between replicas: every cove-node sent each blob straight to its
// owner. Then the owner of a layer of a second image is killed (-9) and the nodes pull
// that image cold at once: every pull completes, the blob the dead replica owned taken
// by the next in rank, still one origin GET per blob.
func TestScaleOutNodeSendsMissToOwner(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/direct:v1", 4, 2<<20)
	img2 := peers.PushRandomImage(t, origin.Addr, "team/direct2:v1", 3, 2<<20)
	_, cr := startScaleOut(t, 3, origin.Addr)
	urls := replicaURLs(cr)
	nodes := make([]*peers.Containerd, len(urls))
	for i := range nodes {
		order := append(append([]string{}, urls[i:]...), urls[:i]...)
		cn := peers.StartCoveNode(t, order, "--origin-plain-http", origin.Addr)
		nodes[i] = peers.StartContainerd(t, peers.WithMirror(cn.URL))
	}

	for i, err := range pullAll(ctx, nodes, img.Ref) {
		if err != nil {
			t.Fatalf("cold pull %d: %v\n%s", i, err, replicaLogs(cr))
		}
	}
	for _, n := range nodes {
		peers.CheckPulled(t, ctx, n, img)
	}
	gets := origin.BlobGETs()
	for _, d := range allBlobs(img) {
		if gets[d] != 1 {
			t.Errorf("origin GETs of %s = %d, want 1", d, gets[d])
		}
	}
	for _, to := range []string{"owner", "origin"} {
		if fw := replicaMetric(t, cr.Replicas, "cove_peer_forwarded_total", `to="`+to+`"`); fw != 0 {
			t.Errorf("cove_peer_forwarded_total{to=%q} = %v over the replicas, want 0: a node sent a blob to a replica that does not own it", to, fw)
		}
	}
	if acc := replicaMetric(t, cr.Replicas, "cove_peer_requests_total", `result="accepted"`); acc != 0 {
		t.Errorf("replicas accepted %v peer requests, want 0", acc)
	}
	// Each replica served the blobs it owns, and only those.
	for _, c := range cr.Replicas {
		own := 0
		for _, d := range allBlobs(img) {
			if cluster.Owner(urls, d) == c.URL {
				own++
			}
		}
		t.Logf("replica %s owns %d of %d blobs; blob requests: %v", c.URL, own, len(allBlobs(img)), c.Metric(t, "cove_requests_total", `operation="blob"`))
	}

	var victim *peers.Cove
	var survivors []*peers.Cove
	owner := cluster.Owner(urls, img2.Layers[0])
	for _, c := range cr.Replicas {
		if c.URL == owner {
			victim = c
		} else {
			survivors = append(survivors, c)
		}
	}
	victim.Kill9()
	t.Logf("killed %s, owner of %s", victim.URL, img2.Layers[0])
	for i, err := range pullAll(ctx, nodes, img2.Ref) {
		if err != nil {
			t.Fatalf("cold pull %d with a replica dead: %v\n%s", i, err, replicaLogs(cr))
		}
	}
	for _, n := range nodes {
		peers.CheckPulled(t, ctx, n, img2)
	}
	gets = origin.BlobGETs()
	for _, d := range allBlobs(img2) {
		if gets[d] != 1 {
			t.Errorf("with a replica dead: origin GETs of %s = %d, want 1", d, gets[d])
		}
	}
	t.Logf("survivors: %v owner-down events, %v fetches from the origin in place of the owner",
		replicaMetric(t, survivors, "cove_peer_owner_down_total"), replicaMetric(t, survivors, "cove_peer_forwarded_total", `to="origin"`))
}
