package evict

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Pins hold whichever replica wrote the tag record; the leader resolves them.
func TestSharedEvictionKeepsPins(t *testing.T) {
	f := newSharedFixture(t, 1<<20, 2, func(c *Config) { c.Pins = []string{"reg.example/team/app:v1"} })
	leader, rest := f.roles()
	follower := rest[0]
	layer := f.put(follower, 300*kib)
	manifest := f.putManifest(follower, layer)
	f.round(follower)
	f.round(leader)
	f.clk.Advance(time.Hour)
	var others []digest.Digest
	for range 5 {
		others = append(others, f.put(follower, 150*kib))
	}
	for range 4 {
		f.round()
	}
	if !f.inBucket(layer) || !f.inBucket(manifest) {
		t.Fatal("a pinned blob was evicted")
	}
	if f.inBucket(others[0]) {
		t.Fatal("the oldest unpinned blob stayed past the bound")
	}
	if got := testutil.ToFloat64(leader.m.PinnedBytes); got < 300*kib {
		t.Fatalf("pinned bytes on the leader = %v", got)
	}
}

// putManifest stores an image manifest listing layer and tags it reg.example/team/app:v1.
func (f *sharedFixture) putManifest(r *replica, layer digest.Digest) digest.Digest {
	f.t.Helper()
	body := []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":%d},"layers":[]}`, layer, 300*kib))
	d := digest.FromBytes(body)
	ctx := context.Background()
	if err := r.s.Put(ctx, d, int64(len(body)), bytes.NewReader(body)); err != nil {
		f.t.Fatal(err)
	}
	tag := fmt.Sprintf(`{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":%q,"size":%d}`, d, len(body))
	if err := r.s.PutRecord(ctx, "tag/reg.example/team/app/@v1", []byte(tag)); err != nil {
		f.t.Fatal(err)
	}
	return d
}

// When the bucket cannot be reached nobody evicts, and it is logged once; the leader
// moves when the leader stops.
func TestSharedEvictionBucketDownAndLeaderMoves(t *testing.T) {
	f := newSharedFixture(t, 1<<20, 2)
	leader, rest := f.roles()
	follower := rest[0]
	for range 6 {
		f.put(follower, 150*kib)
	}
	f.minio.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for range 2 {
		if err := leader.s.Sync(ctx); err == nil {
			t.Fatal("Sync succeeded with the bucket down")
		}
	}
	if got := testutil.ToFloat64(leader.m.Evictions.WithLabelValues(triggerMaxSize)); got != 0 {
		t.Fatalf("evicted %v blobs with the bucket down", got)
	}
	f.minio.Restart(t)
	// The leader stops: its last record says so, and the follower takes over.
	if err := leader.s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.round(follower)
	if !follower.s.IsLeader() {
		t.Fatal("the follower did not take over when the leader stopped")
	}
	for range 3 {
		f.round(follower)
	}
	follower.s.sh.reconciling.Wait()
	f.round(follower)
	if used := follower.s.Used(); used > 1<<20 || used < 500*kib {
		t.Fatalf("the new leader counts %d bytes", used)
	}
	if got := testutil.ToFloat64(follower.m.Evictions.WithLabelValues(triggerMaxSize)); got < 1 {
		t.Fatal("the new leader evicted nothing past the high watermark")
	}
}
