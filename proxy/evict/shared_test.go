package evict

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/storage/s3"
)

// Shared eviction, tested on a real S3 server: each replica is a Store over its own S3
// driver on one bucket, and the test drives their rounds (Sync) by hand.

type replica struct {
	url string
	s   *Store
	m   *metrics.Store
	d   *s3.Driver
}

type sharedFixture struct {
	t        *testing.T
	minio    *peers.MinIO
	bucket   string
	clk      *clock
	members  []string
	replicas []*replica
}

var sharedBuckets atomic.Int64

// newShared starts MinIO and n replicas bounded at max bytes, members of one cluster.
func newSharedFixture(t *testing.T, max int64, n int, mod ...func(*Config)) *sharedFixture {
	t.Helper()
	m := peers.StartMinIO(t)
	m.SetEnv(t)
	t.Setenv("AWS_SESSION_TOKEN", "")
	t.Setenv("AWS_PROFILE", "")
	f := &sharedFixture{t: t, minio: m, clk: &clock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)},
		bucket: fmt.Sprintf("shared%d", sharedBuckets.Add(1))}
	if err := m.MakeBucket(context.Background(), f.bucket); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		f.members = append(f.members, fmt.Sprintf("http://127.0.0.1:%d", 7001+i))
	}
	for _, u := range f.members {
		f.replicas = append(f.replicas, f.start(u, max, mod...))
	}
	return f
}

func (f *sharedFixture) start(url string, max int64, mod ...func(*Config)) *replica {
	f.t.Helper()
	d, err := s3.New(context.Background(), s3.Config{Endpoint: f.minio.Endpoint, Bucket: f.bucket})
	if err != nil {
		f.t.Fatal(err)
	}
	r := &replica{url: url, d: d, m: metrics.NewStore()}
	cfg := Config{MaxSize: max, Clock: f.clk.Now, Metrics: r.m, Interval: time.Hour,
		Logger: slog.New(slog.DiscardHandler),
		Shared: &Shared{Self: url, Members: func() []string { return f.members }, SyncInterval: time.Hour},
	}
	for _, fn := range mod {
		fn(&cfg)
	}
	if r.s, err = New(d, cfg); err != nil {
		f.t.Fatal(err)
	}
	r.s.sh.manual = true
	r.s.Start(context.Background())
	f.t.Cleanup(func() { r.s.Close(context.Background()) })
	return r
}

// round runs one Sync on each replica given (all when none), a second apart.
func (f *sharedFixture) round(rs ...*replica) {
	f.t.Helper()
	if len(rs) == 0 {
		rs = f.replicas
	}
	for _, r := range rs {
		f.clk.Advance(time.Second)
		if err := r.s.Sync(context.Background()); err != nil {
			f.t.Fatalf("%s: Sync: %v", r.url, err)
		}
	}
}

// roles runs rounds until the replicas agree on one leader, and returns it and the rest.
func (f *sharedFixture) roles() (*replica, []*replica) {
	f.t.Helper()
	want := cluster.Owner(f.members, leaderKey)
	for range 3 {
		f.round()
	}
	var leader *replica
	var rest []*replica
	for _, r := range f.replicas {
		if r.s.IsLeader() != (r.url == want) {
			f.t.Fatalf("%s: IsLeader = %v, want the leader to be %s", r.url, r.s.IsLeader(), want)
		}
		if r.url == want {
			leader = r
		} else {
			rest = append(rest, r)
		}
	}
	if got := testutil.ToFloat64(leader.m.EvictLeader); got != 1 {
		f.t.Fatalf("cove_store_evict_leader on the leader = %v", got)
	}
	return leader, rest
}

// put stores a random blob of size bytes and its records through r, as a fill does.
func (f *sharedFixture) put(r *replica, size int) digest.Digest {
	f.t.Helper()
	f.clk.Advance(time.Second)
	b, d := randomBlob(size)
	ctx := context.Background()
	if err := r.s.Put(ctx, d, int64(size), bytes.NewReader(b)); err != nil {
		f.t.Fatal(err)
	}
	for _, k := range blobRecords(d) {
		if err := r.s.PutRecord(ctx, k, nil); err != nil {
			f.t.Fatal(err)
		}
	}
	return d
}

// inBucket reports whether d is in the bucket, asking the bucket, not a Store.
func (f *sharedFixture) inBucket(d digest.Digest) bool {
	_, err := f.replicas[0].d.Stat(context.Background(), d)
	return err == nil
}

// A blob stored through a follower is learned by the leader, evicted by it in two
// phases (refused everywhere first), and leaves the bucket with its records.
func TestSharedEvictionLearnsAndEvicts(t *testing.T) {
	f := newSharedFixture(t, 1<<20, 2)
	leader, rest := f.roles()
	follower := rest[0]
	var blobs []digest.Digest
	for range 6 {
		blobs = append(blobs, f.put(follower, 150*kib)) // 6 x ~166 KiB of 1 MiB: past 90 %
	}
	if !follower.s.IsLeader() && follower.s.Used() < 6*150*kib {
		t.Fatalf("follower counts %d bytes, less than it stored", follower.s.Used())
	}
	// The follower reports, the leader merges and dooms the oldest; nothing is deleted
	// before the follower acknowledges the doomed list.
	f.round(follower)
	f.round(leader)
	if got := leader.s.Used(); got < 6*150*kib {
		t.Fatalf("leader counts %d bytes after merging, want at least %d", got, 6*150*kib)
	}
	doomed := testutil.ToFloat64(leader.m.DoomedBlobs)
	if doomed == 0 {
		t.Fatal("nothing doomed past the high watermark")
	}
	for _, d := range blobs {
		if !f.inBucket(d) {
			t.Fatalf("%s deleted before the follower acknowledged the doomed list", d)
		}
	}
	// The follower installs the list: the oldest blob is refused (a miss) from now on.
	f.round(follower)
	if _, err := follower.s.Open(context.Background(), blobs[0]); !errdefs.IsNotFound(err) {
		t.Fatalf("Open of a doomed blob on the follower: %v, want not found", err)
	}
	f.round(leader)
	if f.inBucket(blobs[0]) || f.hasAnyRecord(blobs[0]) {
		t.Fatalf("the oldest blob or its records outlived the acknowledged doom")
	}
	if !f.inBucket(blobs[5]) {
		t.Fatal("the newest blob was evicted")
	}
	if got := testutil.ToFloat64(leader.m.Evictions.WithLabelValues(triggerMaxSize)); got < 1 {
		t.Fatalf("evictions on the leader = %v", got)
	}
	if got := testutil.ToFloat64(follower.m.Evictions.WithLabelValues(triggerMaxSize)); got != 0 {
		t.Fatalf("the follower evicted %v blobs itself", got)
	}
	f.round()
	if used, limit := follower.s.Used(), int64(9<<20)/10; used > limit {
		t.Fatalf("follower sees %d bytes used after eviction, over the high watermark %d", used, limit)
	}
}

func (f *sharedFixture) hasAnyRecord(d digest.Digest) bool {
	for _, k := range blobRecords(d) {
		if _, err := f.replicas[0].d.GetRecord(context.Background(), k); err == nil {
			return true
		}
	}
	return false
}

// The attack on the two-phase rule: a follower opens a blob after the leader doomed it
// but before it read the doomed list, and reads it slowly. The blob is not deleted while
// the reader holds it, whatever the rounds; it goes once the reader closes.
func TestSharedEvictionNeverDeletesUnderAReader(t *testing.T) {
	f := newSharedFixture(t, 1<<20, 3)
	leader, rest := f.roles()
	reader := rest[0]
	old := f.put(reader, 200*kib)
	f.round(reader)
	f.round(leader)
	f.clk.Advance(time.Minute)
	for range 4 {
		f.put(rest[1], 200*kib)
	}
	f.round(rest[1])
	f.round(leader) // merges, dooms old (the least recently used)
	if testutil.ToFloat64(leader.m.DoomedBlobs) == 0 {
		t.Fatal("nothing doomed")
	}
	// The reader has not read the doomed list yet: its open goes through.
	b, err := reader.s.Open(context.Background(), old)
	if err != nil {
		t.Fatalf("open before the doomed list was read: %v", err)
	}
	defer b.Close()
	buf := make([]byte, 10*kib)
	var got int64
	for i := range 6 {
		f.round() // every replica, the leader included, several times
		if !f.inBucket(old) {
			t.Fatalf("round %d: the blob was deleted while a reader on %s held it", i, reader.url)
		}
		n, err := io.ReadFull(b, buf)
		if err != nil {
			t.Fatalf("round %d: reading the held blob: %v", i, err)
		}
		got += int64(n)
	}
	rest2, err := io.ReadAll(b)
	if err != nil || got+int64(len(rest2)) != 200*kib {
		t.Fatalf("the held blob read %d bytes (%v), want %d", got+int64(len(rest2)), err, 200*kib)
	}
	// A second open on the reader is refused now that it has read the list.
	if _, err := reader.s.Open(context.Background(), old); !errdefs.IsNotFound(err) {
		t.Fatalf("a new open of the doomed blob: %v, want not found", err)
	}
	b.Close()
	f.round(reader)
	f.round(leader)
	if f.inBucket(old) {
		t.Fatal("the doomed blob stayed after its reader closed and every replica acknowledged")
	}
}

// A replica that stops writing its record stops being waited for after StaleAfter;
// before that it has fenced itself: it opens nothing and its readers are cut off.
func TestSharedEvictionStaleReplicaFencesItself(t *testing.T) {
	f := newSharedFixture(t, 1<<20, 2)
	leader, rest := f.roles()
	silent := rest[0]
	old := f.put(silent, 200*kib)
	f.round(silent)
	b, err := silent.s.Open(context.Background(), old)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	f.round(silent) // reports it open
	f.clk.Advance(time.Minute)
	for range 4 {
		f.put(leader, 200*kib)
	}
	f.round(leader)
	if !f.inBucket(old) {
		t.Fatal("a blob open on a live replica was evicted")
	}
	// silent stops syncing. Past StaleAfter/2 it fences: reads fail, opens are misses.
	f.clk.Advance(silent.s.sh.cfg.StaleAfter/2 + time.Second)
	if _, err := b.Read(make([]byte, 1)); !errdefs.IsUnavailable(err) {
		t.Fatalf("a read on a fenced replica: %v, want unavailable", err)
	}
	if _, err := silent.s.Open(context.Background(), old); !errdefs.IsNotFound(err) {
		t.Fatalf("an open on a fenced replica: %v, want not found", err)
	}
	// Before StaleAfter the leader still waits for it.
	f.round(leader)
	if !f.inBucket(old) {
		t.Fatal("evicted while the silent replica's record was still fresh")
	}
	f.clk.Advance(silent.s.sh.cfg.StaleAfter)
	f.round(leader) // no longer waits for silent, nor takes old as open there
	// Newer blobs keep the store past its bound: old, the least recently used, must go
	// within a few rounds (were it still protected, the newer ones would go instead).
	for i := 0; f.inBucket(old); i++ {
		if i == 8 {
			leader.s.mu.Lock()
			t.Logf("entry %+v doomed %d open %v used %d", leader.s.blobs[old], len(leader.s.sh.doomed), leader.s.sh.openElsewhere, leader.s.usedLocked())
			leader.s.mu.Unlock()
			t.Fatal("a stale replica still held eviction back")
		}
		f.put(leader, 200*kib)
		f.round(leader)
	}
	// It syncs again: it is live, and opens work again.
	f.round(silent)
	if _, err := silent.s.Open(context.Background(), f.put(silent, kib)); err != nil {
		t.Fatalf("open after the replica synced again: %v", err)
	}
}
