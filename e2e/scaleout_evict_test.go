package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/cove-oci/cove/internal/peers"
)

// startBoundedScaleOut starts MinIO and three replicas on its bucket, bounded at 40 MiB
// with pin pinned, exchanging their eviction records every second.
func startBoundedScaleOut(t *testing.T, origin, pin string) (*peers.MinIO, *peers.CoveReplicas) {
	t.Helper()
	m := peers.StartMinIO(t)
	m.SetEnv(t)
	cr := peers.StartCoveReplicas(t, 3, "--origin-plain-http", origin, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket,
		"--storage-max-size", "40MiB", "--pin", pin, "--peer-sync-interval", "1s")
	return m, cr
}

const sharedBound = 40 << 20

// evictLeader waits until exactly one replica says it leads eviction and returns its index.
func evictLeader(t *testing.T, cr *peers.CoveReplicas) int {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		leader, n := -1, 0
		for i, c := range cr.Replicas {
			if c.Metric(t, "cove_store_evict_leader") == 1 {
				leader, n = i, n+1
			}
		}
		if n == 1 {
			return leader
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d replicas lead eviction, want 1\n%s", n, replicaLogs(cr))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// doomedDigests reads every replica's doomed list from the bucket.
func doomedDigests(t *testing.T, ctx context.Context, m *peers.MinIO) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	forEachRecord(t, ctx, m, "records/evict/doomed/", func(rec evictRecord) {
		for _, d := range rec.Doomed {
			out[d] = true
		}
	})
	return out
}

// evictRecord holds the fields the tests read of the replicas' seen records and the
// leader's doomed lists (proxy/evict/shared_records.go).
type evictRecord struct {
	Member string
	Seq    uint64
	Open   []string
	Doomed []string
}

func forEachRecord(t *testing.T, ctx context.Context, m *peers.MinIO, prefix string, fn func(evictRecord)) {
	t.Helper()
	c, err := m.Client()
	if err != nil {
		t.Fatal(err)
	}
	for o := range c.ListObjects(ctx, m.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		obj, err := c.GetObject(ctx, m.Bucket, o.Key, minio.GetObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		var rec evictRecord
		err = json.NewDecoder(obj).Decode(&rec)
		obj.Close()
		if err != nil {
			t.Fatalf("%s: %v", o.Key, err)
		}
		fn(rec)
	}
}

// waitLeaderSeesOpen waits until a replica's record lists d open (open false: no
// record does) and the leader has merged that record: the leader learns of a reader
// only through the records, one round late. Until then it may doom a blob being read
// (it is never deleted under the reader: that is the second phase's check, which waits
// for the reader's own record), or spare one no longer read.
func waitLeaderSeesOpen(t *testing.T, ctx context.Context, m *peers.MinIO, d string, cr *peers.CoveReplicas, open bool) {
	t.Helper()
	// Each doomed list's seq, by writer: only the leader's moves, once per round.
	rounds := func() map[string]uint64 {
		out := map[string]uint64{}
		forEachRecord(t, ctx, m, "records/evict/doomed/", func(rec evictRecord) { out[rec.Member] = rec.Seq })
		return out
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		listed := false
		forEachRecord(t, ctx, m, "records/evict/seen/", func(rec evictRecord) { listed = listed || slices.Contains(rec.Open, d) })
		if listed == open {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replicas' records list %s open: %v, want %v\n%s", d, listed, open, replicaLogs(cr))
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The leader rewrites its doomed list every round, after it read the records: the
	// second round after this one read them after the open was listed.
	first := rounds()
	for moved := false; !moved; time.Sleep(200 * time.Millisecond) {
		for member, seq := range rounds() {
			moved = moved || seq >= first[member]+2 && first[member] != 0
		}
		if time.Now().After(deadline) {
			t.Fatalf("the eviction leader made no two rounds in a minute\n%s", replicaLogs(cr))
		}
	}
}

// bucketBytes is what the bucket holds, listed.
func bucketBytes(t *testing.T, ctx context.Context, m *peers.MinIO) int64 {
	var total int64
	for _, size := range bucketObjects(t, ctx, m) {
		total += size
	}
	return total
}

func pullThrough(t *testing.T, ctx context.Context, c *peers.Cove, img peers.Image) {
	t.Helper()
	n := peers.StartContainerd(t, peers.WithMirror(c.URL))
	defer n.Stop()
	if err := n.Pull(ctx, img.Ref); err != nil {
		t.Fatalf("pull %s through %s: %v", img.Ref, c.URL, err)
	}
	peers.CheckPulled(t, ctx, n, img)
}

// Three replicas on one bucket bounded at 40 MiB; fresh containerds pull 68 MiB of
// images one after another, each through another replica: every pull verifies, the
// bucket never holds more than the bound, only the leader evicts, the pinned image
// stays whichever replica stored it, and the least recently used image is the first to
// go, with its records, and pulls again.
func TestScaleOutSharedEvictionKeepsTheBound(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	origin := peers.StartRegistry(t)
	pinned := peers.PushRandomImage(t, origin.Addr, "base/runtime:v1", 2, 4<<20)
	var imgs []peers.Image
	for _, name := range []string{"a", "b", "c", "d", "e"} {
		imgs = append(imgs, peers.PushRandomImage(t, origin.Addr, "team/"+name+":v1", 3, 4<<20))
	}
	m, cr := startBoundedScaleOut(t, origin.Addr, origin.Addr+"/base/runtime:v1")
	leader := evictLeader(t, cr)
	pullThrough(t, ctx, cr.Replicas[(leader+1)%3], pinned) // stored by a follower
	var largest int64
	for i, img := range imgs {
		pullThrough(t, ctx, cr.Replicas[i%3], img)
		largest = max(largest, bucketBytes(t, ctx, m))
	}
	t.Logf("largest bucket after a pull: %.1f MiB (bound 40 MiB); evictions on the leader %v (%.1f MiB)", float64(largest)/(1<<20),
		cr.Replicas[leader].Metric(t, "cove_store_evictions_total"), cr.Replicas[leader].Metric(t, "cove_store_evicted_bytes_total")/(1<<20))
	if largest > sharedBound {
		t.Errorf("the bucket held %d bytes, over the bound", largest)
	}
	if cr.Replicas[leader].Metric(t, "cove_store_evictions_total") == 0 {
		t.Fatal("the leader evicted nothing with 68 MiB pulled into 40 MiB")
	}
	for i, c := range cr.Replicas {
		if i != leader && c.Metric(t, "cove_store_evictions_total") != 0 {
			t.Errorf("replica %d evicted although it does not lead", i)
		}
	}
	objs := bucketObjects(t, ctx, m)
	for _, d := range append([]string{pinned.Digest, pinned.Config}, pinned.Layers...) {
		if _, ok := objs[blobKey(d)]; !ok {
			t.Errorf("pinned blob %s is not in the bucket", d)
		}
	}
	// The least recently used image is evicted first. How much of it goes depends on
	// how far the last fills pushed past the high watermark (the leader frees down to
	// the low one, and refuses fills that do not fit rather than overshoot), so the
	// check is that some of it went, with its records; nothing of it was refused room
	// (it was pulled first, into an empty bucket), so a blob of it missing was evicted.
	first := imgs[0]
	var gone []string
	for _, d := range append([]string{first.Digest, first.Config}, first.Layers...) {
		if _, ok := objs[blobKey(d)]; !ok {
			gone = append(gone, d)
		}
	}
	if len(gone) == 0 {
		t.Fatalf("every blob of the least recently used image is still in the bucket")
	}
	for key := range objs {
		for _, d := range gone {
			if strings.Contains(key, strings.TrimPrefix(d, "sha256:")) {
				t.Errorf("object %s outlived its evicted blob", key)
			}
		}
	}
	checkBucketBlobs(t, ctx, m)
	pullThrough(t, ctx, cr.Replicas[(leader+2)%3], first)
}

// The attack on the two-phase rule: a client reads a large blob slowly from a replica
// that does not lead eviction while the store passes its bound. The leader evicts
// others but not that blob while it is read, the client gets every byte right, and the
// blob goes once the client is done and room is needed again.
func TestScaleOutEvictionSparesABlobBeingRead(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	origin := peers.StartRegistry(t)
	pinned := peers.PushRandomImage(t, origin.Addr, "base/runtime:v1", 2, 4<<20)
	held := peers.PushRandomImage(t, origin.Addr, "held/app:v1", 1, 24<<20)
	more := []peers.Image{
		peers.PushRandomImage(t, origin.Addr, "team/b:v1", 3, 4<<20),
		peers.PushRandomImage(t, origin.Addr, "team/c:v1", 3, 4<<20),
	}
	m, cr := startBoundedScaleOut(t, origin.Addr, origin.Addr+"/base/runtime:v1")
	leader := evictLeader(t, cr)
	reader := cr.Replicas[(leader+1)%3]
	other := cr.Replicas[(leader+2)%3]
	pullThrough(t, ctx, other, pinned)
	pullThrough(t, ctx, reader, held)
	layer := held.Layers[0]
	if _, ok := bucketObjects(t, ctx, m)[blobKey(layer)]; !ok {
		t.Fatal("the held image's layer was not stored")
	}

	// A slow reader on a follower: 1 MiB read, then it stops reading for a while; the
	// replica is blocked writing to it with the blob open.
	u := reader.URL + "/v2/held/app/blobs/" + layer + "?ns=" + url.QueryEscape(origin.Addr)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", u, resp.Status)
	}
	h := sha256.New()
	if _, err := io.CopyN(h, resp.Body, 1<<20); err != nil {
		t.Fatal(err)
	}
	waitLeaderSeesOpen(t, ctx, m, layer, cr, true)
	before := cr.Replicas[leader].Metric(t, "cove_store_evictions_total")
	pullThrough(t, ctx, other, more[0]) // 8 + 24 + 12 MiB: past the high watermark
	for deadline := time.Now().Add(60 * time.Second); cr.Replicas[leader].Metric(t, "cove_store_evictions_total") == before; time.Sleep(500 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the leader evicted nothing past the high watermark\n%s", replicaLogs(cr))
		}
	}
	// Five sync intervals, the held blob open throughout. MinIO itself makes a DELETE
	// wait for a GET in progress, so the leader is also checked not to choose the blob
	// at all (it knows it is open) and to stay the one leader (a DELETE blocked on MinIO
	// would stall it until another replica took over).
	for range 5 {
		if _, ok := bucketObjects(t, ctx, m)[blobKey(layer)]; !ok {
			t.Fatalf("the blob being read on %s was deleted under its reader", reader.URL)
		}
		if doomed := doomedDigests(t, ctx, m); doomed[layer] {
			t.Fatalf("the leader chose the blob being read on %s for eviction", reader.URL)
		}
		time.Sleep(time.Second)
	}
	if now := evictLeader(t, cr); now != leader {
		t.Fatalf("the eviction leader moved from replica %d to %d while the blob was read", leader, now)
	}
	if _, err := io.Copy(h, resp.Body); err != nil {
		t.Fatalf("reading the rest of the held blob: %v", err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != layer {
		t.Fatalf("the held blob read as %s, want %s", got, layer)
	}
	resp.Body.Close()

	// Done reading: it is the least recently used unpinned blob, and goes when room is
	// needed again, once the leader knows it is no longer read (before, it would spare
	// it and free the next blob in line, which is enough: the bound is exact).
	waitLeaderSeesOpen(t, ctx, m, layer, cr, false)
	pullThrough(t, ctx, other, more[1])
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, ok := bucketObjects(t, ctx, m)[blobKey(layer)]; !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the blob stayed after its reader finished and room was needed\n%s", replicaLogs(cr))
		}
		time.Sleep(500 * time.Millisecond)
	}
	if got := bucketBytes(t, ctx, m); got > sharedBound {
		t.Errorf("the bucket holds %d bytes, over the bound", got)
	}
}
