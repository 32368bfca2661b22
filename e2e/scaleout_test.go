package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
)

// startScaleOut starts a MinIO and n cove-cache replicas on its bucket, reaching origin
// (HOST:PORT) over plain HTTP.
func startScaleOut(t *testing.T, n int, origin string) (*peers.MinIO, *peers.CoveReplicas) {
	t.Helper()
	m := peers.StartMinIO(t)
	m.SetEnv(t)
	cr := peers.StartCoveReplicas(t, n, "--origin-plain-http", origin, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket)
	return m, cr
}

func replicaURLs(cr *peers.CoveReplicas) []string {
	var urls []string
	for _, c := range cr.Replicas {
		urls = append(urls, c.URL)
	}
	return urls
}

// replicaMetric sums a metric over every replica that is still running.
func replicaMetric(t *testing.T, replicas []*peers.Cove, name string, labels ...string) float64 {
	t.Helper()
	var sum float64
	for _, c := range replicas {
		sum += c.Metric(t, name, labels...)
	}
	return sum
}

// pullAll pulls ref on every containerd at once and returns each pull's error.
func pullAll(ctx context.Context, nodes []*peers.Containerd, ref string) []error {
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, c := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = c.Pull(ctx, ref)
		}()
	}
	wg.Wait()
	return errs
}

// checkPulledAll is peers.CheckPulled on every node, the nodes at once: each check
// runs a ctr process per blob, which adds up with eight nodes on a loaded machine.
func checkPulledAll(t *testing.T, ctx context.Context, nodes []*peers.Containerd, img peers.Image) {
	t.Helper()
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, c := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := c.ImageTarget(ctx, img.Ref)
			switch {
			case err != nil:
				errs[i] = err
			case got != img.Digest:
				errs[i] = fmt.Errorf("target of %s = %s, pushed %s", img.Ref, got, img.Digest)
			default:
				errs[i] = c.ReadAllContent(ctx, img.Ref)
			}
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("node %d: %v", i, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
}

// checkServedByCache checks that cove-node i had at least min requests served by a
// cache and none relayed from the origin or handed over to containerd (naming the
// reasons and the node's log when it did).
func checkServedByCache(t *testing.T, i int, cn *peers.CoveNode, want int) {
	t.Helper()
	if got := cn.Metric(t, "cove_node_requests_total", `served_by="cache"`); got < float64(want) {
		t.Errorf("cove-node %d: %v requests served by the cache, want at least %d", i, got, want)
	}
	for _, by := range []string{"origin", "handoff"} {
		got := cn.Metric(t, "cove_node_requests_total", `served_by="`+by+`"`)
		if got == 0 {
			continue
		}
		var why []string
		for _, r := range []string{"breaker-open", "connect", "headers", "status", "stall", "slow-origin", "no-cache"} {
			if n := cn.Metric(t, "cove_node_requests_total", `served_by="`+by+`"`, `reason="`+r+`"`); n != 0 {
				why = append(why, fmt.Sprintf("%s: %v", r, n))
			}
		}
		t.Errorf("cove-node %d: %v requests served_by=%s (%s), want 0\n%s", i, got, by, strings.Join(why, ", "), s3LogTail(cn.LogPath))
	}
}

func replicaLogs(cr *peers.CoveReplicas) string {
	var b strings.Builder
	for i, c := range cr.Replicas {
		b.WriteString("--- replica " + string(rune('0'+i)) + " " + c.URL + "\n" + s3LogTail(c.LogPath) + "\n")
	}
	return b.String()
}

// checkBucketBlobs reads every blob object in the bucket (blobs and manifests) back and
// checks its bytes against its digest: whatever happened, nothing corrupt is stored. It
// returns how many objects there are (an object deleted between the listing and its
// read, as eviction may, is not counted).
func checkBucketBlobs(t *testing.T, ctx context.Context, m *peers.MinIO) int {
	t.Helper()
	c, err := m.Client()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for obj := range c.ListObjects(ctx, m.Bucket, minio.ListObjectsOptions{Prefix: "blobs/sha256/", Recursive: true}) {
		if obj.Err != nil {
			t.Fatal(obj.Err)
		}
		r, err := c.GetObject(ctx, m.Bucket, obj.Key, minio.GetObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		_, err = io.Copy(h, r)
		r.Close()
		if minio.ToErrorResponse(err).Code == "NoSuchKey" {
			continue // evicted since the listing: no longer stored
		}
		if err != nil {
			t.Fatalf("reading %s: %v", obj.Key, err)
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != strings.TrimPrefix(obj.Key, "blobs/sha256/") {
			t.Errorf("%s in the bucket holds bytes of sha256:%s", obj.Key, got)
		}
		n++
	}
	return n
}

// Eight fresh containerds pull one cold image at once, each through its own cove-node,
// over three replicas on one bucket. Half the cove-nodes are given the three replicas
// (each in another order), as --caches-from-endpointslices gives them, and send each blob
// straight to its owner; the other half are given one Service address, a balancer that
// spreads their connections over the replicas, so their misses land on replicas that do
// not own the blob and are forwarded to the owner. Both kinds ask for every blob at
// once: the origin sees one GET per blob, every digest is right, every node was served by
// the cache, every replica took requests, and each blob is in the bucket once and right.
// A warm pull through a replica then costs the origin nothing.
func TestScaleOutColdPullOneOriginFetch(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/scale:v1", 4, 4<<20)
	m, cr := startScaleOut(t, 3, origin.Addr)
	urls := replicaURLs(cr)
	var addrs []string
	for _, c := range cr.Replicas {
		addrs = append(addrs, c.Addr)
	}
	service := peers.StartBalancer(t, addrs...)
	const fresh = 8
	nodes := make([]*peers.Containerd, fresh)
	coveNodes := make([]*peers.CoveNode, fresh)
	for i := range nodes {
		caches := []string{service.URL}
		if i%2 == 1 {
			k := (i / 2) % len(urls)
			caches = append(append([]string{}, urls[k:]...), urls[:k]...)
		}
		// --probe-timeout: this test is about the replicas' one origin fetch, not cove-node's
		// failure detection (TestScaleOutKillOwnerDuringColdPull, plugin/mirror). On a
		// loaded machine (load average 20 on 2 cores) every replica's trivial /healthz
		// once took over the default 300 ms at the same instant, and the nodes resumed
		// blobs from the origin, as they are meant to from a dead cache.
		coveNodes[i] = peers.StartCoveNode(t, caches, "--origin-plain-http", origin.Addr, "--probe-timeout", "5s")
		nodes[i] = peers.StartContainerd(t, peers.WithMirror(coveNodes[i].URL))
	}
	start := time.Now()
	for i, err := range pullAll(ctx, nodes, img.Ref) {
		if err != nil {
			t.Fatalf("cold pull %d: %v\n%s", i, err, replicaLogs(cr))
		}
	}
	t.Logf("%d cold pulls through cove-nodes over three replicas: %v", fresh, time.Since(start))
	checkPulledAll(t, ctx, nodes, img)
	for i, cn := range coveNodes {
		checkServedByCache(t, i, cn, len(allBlobs(img))+1)
	}
	for i, c := range cr.Replicas {
		// The balancer hands each new connection to the next replica, and the Service's
		// nodes opened more than three: every replica took some.
		if got := c.Metric(t, "cove_requests_total"); got == 0 {
			t.Errorf("replica %d (%s) served no request: the nodes did not spread over the replicas", i, c.URL)
		}
	}
	if service.DialFailures() != 0 {
		t.Errorf("the balancer could not reach a replica %d times", service.DialFailures())
	}
	gets := origin.BlobGETs()
	for _, d := range allBlobs(img) {
		if gets[d] != 1 {
			t.Errorf("origin GETs of %s = %d, want 1", d, gets[d])
		}
	}
	// The Service's nodes asked replicas at random for each blob: some of those asked
	// a replica that does not own it (all four nodes' five blobs landing on their owners
	// by chance is (1/3)^20).
	fw := replicaMetric(t, cr.Replicas, "cove_peer_forwarded_total", `to="owner"`)
	if fw == 0 {
		t.Error("no miss was forwarded to its owner")
	}
	t.Logf("misses forwarded to their owner: %v", fw)
	if acc := replicaMetric(t, cr.Replicas, "cove_peer_requests_total", `result="accepted"`); acc == 0 {
		t.Error("no replica accepted a peer request")
	}
	if rej := replicaMetric(t, cr.Replicas, "cove_peer_requests_total", `result="rejected"`); rej != 0 {
		t.Errorf("%v peer requests between genuine replicas were rejected", rej)
	}
	waitObjects(t, ctx, m, allBlobs(img))
	waitObjects(t, ctx, m, []string{img.Digest})
	if n := checkBucketBlobs(t, ctx, m); n != len(allBlobs(img))+1 {
		t.Errorf("%d objects in the bucket, want %d: the blobs and the manifest, once each", n, len(allBlobs(img))+1)
	}

	// Warm: every blob is a hit on any replica (it owns some, not all).
	before := origin.BlobGETs()
	warm := peers.StartContainerd(t, peers.WithMirror(cr.Replicas[1].URL))
	if err := warm.Pull(ctx, img.Ref); err != nil {
		t.Fatalf("warm pull: %v", err)
	}
	peers.CheckPulled(t, ctx, warm, img)
	after := origin.BlobGETs()
	for _, d := range allBlobs(img) {
		if after[d] != before[d] {
			t.Errorf("warm pulls: %d origin GETs of %s, want 0", after[d]-before[d], d)
		}
	}
}

// kill -9 of the replica that owns a layer while three nodes pull a cold image through
// cove-nodes given the three replicas (each lists them in another order; they send each
// blob to its owner, and finish what the dead owner broke off from the next in rank),
// from a slow origin: every pull completes with the right digests, the other replicas
// route around the dead owner, nothing corrupt is in the bucket, and a warm pull through
// a survivor costs the origin no blob.
func TestScaleOutKillOwnerDuringColdPull(t *testing.T) {
	ctx := testCtx(t)
	registry := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, registry.Addr, "team/scalekill:v1", 3, 8<<20)
	slow := peers.StartRateLimitProxy(t, registry.Addr, 4<<20) // 2 s per layer
	img.Ref = strings.Replace(img.Ref, registry.Addr, slow.Addr, 1)
	m, cr := startScaleOut(t, 3, slow.Addr)
	urls := replicaURLs(cr)
	var victim *peers.Cove
	var survivors []*peers.Cove
	owner := cluster.Owner(urls, img.Layers[0])
	for _, c := range cr.Replicas {
		if c.URL == owner {
			victim = c
		} else {
			survivors = append(survivors, c)
		}
	}
	nodes := make([]*peers.Containerd, len(urls))
	for i := range nodes {
		order := append(append([]string{}, urls[i:]...), urls[:i]...)
		cn := peers.StartCoveNode(t, order, "--origin-plain-http", slow.Addr)
		nodes[i] = peers.StartContainerd(t, peers.WithMirror(cn.URL))
	}

	errc := make(chan []error, 1)
	go func() { errc <- pullAll(ctx, nodes, img.Ref) }()
	// Kill the owner once its origin fill is a good way into a layer.
	deadline := time.Now().Add(60 * time.Second)
	for victim.Metric(t, "cove_origin_bytes_total") < 3<<20 {
		if time.Now().After(deadline) {
			t.Fatalf("the owner fetched nothing from the origin in 60 s\n%s", replicaLogs(cr))
		}
		time.Sleep(20 * time.Millisecond)
	}
	victim.Kill9()
	t.Logf("killed the owner %s mid-fill", victim.URL)
	for i, err := range <-errc {
		if err != nil {
			t.Fatalf("pull %d with its owner killed: %v\n%s", i, err, replicaLogs(cr))
		}
	}
	for _, n := range nodes {
		peers.CheckPulled(t, ctx, n, img)
	}
	down := replicaMetric(t, survivors, "cove_peer_owner_down_total")
	if down == 0 {
		t.Errorf("no survivor routed around the dead owner\n%s", replicaLogs(cr))
	}
	t.Logf("survivors: %v owner-down events, %v peer streams resumed (ranged), %v fetches from the origin in place of the owner",
		down, replicaMetric(t, survivors, "cove_peer_resumes_total", `result="ranged"`),
		replicaMetric(t, survivors, "cove_peer_forwarded_total", `to="origin"`))
	waitObjects(t, ctx, m, allBlobs(img))
	checkBucketBlobs(t, ctx, m)

	before := registry.BlobGETs()
	warm := peers.StartContainerd(t, peers.WithMirror(survivors[0].URL))
	if err := warm.Pull(ctx, img.Ref); err != nil {
		t.Fatalf("warm pull through a survivor: %v", err)
	}
	peers.CheckPulled(t, ctx, warm, img)
	after := registry.BlobGETs()
	for _, d := range allBlobs(img) {
		if after[d] != before[d] {
			t.Errorf("warm pull: %d origin GETs of %s, want 0", after[d]-before[d], d)
		}
	}
}
