package evict

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/proxy/fill"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/storage"
	"github.com/cove-oci/cove/proxy/storage/filesystem"
)

// clock is the injected clock: time moves only when a test says so.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

type fixture struct {
	t     *testing.T
	inner *filesystem.Driver
	clk   *clock
	m     *metrics.Store
	s     *Store
}

const kib = 1 << 10

// newFixture bounds a real filesystem store at max bytes.
func newFixture(t *testing.T, max int64, mod ...func(*Config)) *fixture {
	t.Helper()
	inner, err := filesystem.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inner.Close() })
	f := &fixture{t: t, inner: inner, clk: &clock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}}
	f.s = f.open(max, mod...)
	return f
}

// open builds a Store over the fixture's driver (a restart opens a second one).
func (f *fixture) open(max int64, mod ...func(*Config)) *Store {
	f.t.Helper()
	return f.openOn(f.inner, max, mod...)
}

// openOn builds a Store over inner, a driver wrapping the fixture's one.
func (f *fixture) openOn(inner storage.Driver, max int64, mod ...func(*Config)) *Store {
	f.t.Helper()
	f.m = metrics.NewStore()
	cfg := Config{MaxSize: max, Clock: f.clk.Now, Metrics: f.m, Interval: time.Hour, Logger: slog.New(slog.DiscardHandler)}
	for _, fn := range mod {
		fn(&cfg)
	}
	s, err := New(inner, cfg)
	if err != nil {
		f.t.Fatal(err)
	}
	return s
}

// put stores a random blob of size bytes with its provenance and membership records, as
// the server does for a fill, one second after the previous one.
func (f *fixture) put(size int) digest.Digest {
	f.t.Helper()
	f.clk.Advance(time.Second)
	b, d := randomBlob(size)
	ctx := context.Background()
	if err := f.s.Put(ctx, d, int64(size), bytes.NewReader(b)); err != nil {
		f.t.Fatal(err)
	}
	for _, k := range blobRecords(d) {
		if err := f.s.PutRecord(ctx, k, nil); err != nil {
			f.t.Fatal(err)
		}
	}
	return d
}

// randomBlob is size random bytes and their digest.
func randomBlob(size int) ([]byte, digest.Digest) {
	b := make([]byte, size)
	rand.Read(b)
	return b, digest.FromBytes(b)
}

func blobRecords(d digest.Digest) []string {
	return []string{
		"provenance/" + d.Algorithm().String() + "/" + d.Encoded() + "/reg.example",
		"membership/reg.example/team/app/@" + d.String(),
	}
}

func (f *fixture) touch(d digest.Digest) {
	f.t.Helper()
	f.clk.Advance(time.Second)
	b, err := f.s.Open(context.Background(), d)
	if err != nil {
		f.t.Fatal(err)
	}
	b.Close()
}

func (f *fixture) stored(d digest.Digest) bool {
	_, err := f.inner.Stat(context.Background(), d)
	return err == nil
}

// hasRecords reports whether all (true) or none (false) of d's records are stored; it
// fails the test on a mix.
func (f *fixture) hasRecords(d digest.Digest) bool {
	f.t.Helper()
	n := 0
	for _, k := range blobRecords(d) {
		if _, err := f.inner.GetRecord(context.Background(), k); err == nil {
			n++
		}
	}
	if n != 0 && n != len(blobRecords(d)) {
		f.t.Fatalf("%s: %d of its records left", d, n)
	}
	return n > 0
}

func (f *fixture) wantStored(want map[digest.Digest]bool) {
	f.t.Helper()
	for d, w := range want {
		if got := f.stored(d); got != w {
			f.t.Errorf("blob %s stored = %v, want %v", d.Encoded()[:8], got, w)
		}
		if got := f.hasRecords(d); got != w {
			f.t.Errorf("records of %s stored = %v, want %v", d.Encoded()[:8], got, w)
		}
	}
}

// The least recently used blob goes first, with its records; a blob read since it was
// stored counts as recent.
func TestLeastRecentlyUsedFirst(t *testing.T) {
	// Each 100 KiB blob costs 100 KiB + 2 records of 8 KiB = 116 KiB; 4 fit in 480 KiB.
	f := newFixture(t, 480*kib)
	a, b, c := f.put(100*kib), f.put(100*kib), f.put(100*kib)
	f.touch(a)
	if used := f.s.Used(); used != 3*116*kib {
		t.Fatalf("used = %d, want %d", used, 3*116*kib)
	}
	d := f.put(100 * kib) // 464 KiB: fits
	e := f.put(100 * kib) // does not: b (the oldest not read since) goes
	f.wantStored(map[digest.Digest]bool{a: true, b: false, c: true, d: true, e: true})
	if got := testutil.ToFloat64(f.m.Evictions.WithLabelValues(triggerMaxSize)); got != 1 {
		t.Fatalf("evictions = %v, want 1", got)
	}
	if got := testutil.ToFloat64(f.m.EvictedBytes.WithLabelValues(triggerMaxSize)); got != 100*kib {
		t.Fatalf("evicted bytes = %v, want %d", got, 100*kib)
	}
	if _, err := f.s.Stat(context.Background(), b); !errdefs.IsNotFound(err) {
		t.Fatalf("Stat of an evicted blob: %v", err)
	}
}

// A blob a client is reading is never deleted under it; once closed it may go.
func TestOpenBlobIsNotEvicted(t *testing.T) {
	f := newFixture(t, 480*kib)
	a, b := f.put(100*kib), f.put(100*kib)
	r, err := f.s.Open(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	f.clk.Advance(-time.Hour) // make a the oldest again while it is open
	r2, _ := f.s.Open(context.Background(), a)
	r2.Close()
	f.clk.Advance(time.Hour)
	if freed := f.s.evictBytes(context.Background(), 1, triggerMaxSize); freed == 0 {
		t.Fatal("nothing evicted")
	}
	f.wantStored(map[digest.Digest]bool{a: true, b: false})
	buf := make([]byte, 10)
	if _, err := r.ReadAt(buf, 0); err != nil {
		t.Fatalf("reading the open blob: %v", err)
	}
	r.Close()
	f.s.evictBytes(context.Background(), 1, triggerMaxSize)
	f.wantStored(map[digest.Digest]bool{a: false})
}

// A fill reserves its size first; one that cannot fit even after eviction is refused.
func TestReserve(t *testing.T) {
	f := newFixture(t, 480*kib)
	ctx := context.Background()
	key := fill.Key{Registry: "reg.example", Digest: digest.FromString("x")}
	if _, err := f.s.Reserve(ctx, key, 500*kib); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("a blob larger than the store: %v", err)
	}
	a := f.put(100 * kib)
	b := f.put(100 * kib)
	release, err := f.s.Reserve(ctx, key, 300*kib) // 308 KiB + 232 KiB > 480 KiB: a goes
	if err != nil {
		t.Fatal(err)
	}
	f.wantStored(map[digest.Digest]bool{a: false, b: true})
	if used := f.s.Used(); used > 480*kib {
		t.Fatalf("used %d past the bound", used)
	}
	// b is being read and the reservation holds the rest: a second fill is refused.
	r, _ := f.s.Open(ctx, b)
	if _, err := f.s.Reserve(ctx, key, 100*kib); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("second reservation: %v", err)
	}
	if got := testutil.ToFloat64(f.m.ReserveRefused); got != 2 {
		t.Fatalf("refused = %v, want 2", got)
	}
	release(false)
	release(false) // once only
	if got := testutil.ToFloat64(f.m.ReservedBytes); got != 0 {
		t.Fatalf("reserved after release = %v", got)
	}
	if _, err := f.s.Reserve(ctx, key, 100*kib); err != nil {
		t.Fatalf("after release: %v", err)
	}
	r.Close()
}

// Past the high watermark the background evictor frees down to the low one.
func TestWatermarks(t *testing.T) {
	f := newFixture(t, 1000*kib)
	f.s.Start(context.Background())
	defer f.s.Close(context.Background())
	for i := 0; i < 7; i++ { // 7 x 116 KiB = 812 KiB: under 90 %
		f.put(100 * kib)
	}
	if got := testutil.ToFloat64(f.m.Evictions.WithLabelValues(triggerMaxSize)); got != 0 {
		t.Fatalf("evictions under the high watermark: %v", got)
	}
	f.put(100 * kib) // 928 KiB > 900 KiB
	// The evictor frees down to 800 KiB as it sees the store; a record written while it
	// runs may land after it, so the end state is at least under the high watermark.
	waitFor(t, func() bool { return testutil.ToFloat64(f.m.Evictions.WithLabelValues(triggerMaxSize)) >= 1 })
	waitFor(t, func() bool { return f.s.Used() <= 900*kib })
	if got := testutil.ToFloat64(f.m.Evictions.WithLabelValues(triggerMaxSize)); got > 2 {
		t.Fatalf("evictions = %v, want 1 or 2 (928 KiB down to 800 KiB)", got)
	}
}

// Free space below --storage-min-free evicts too.
func TestMinFree(t *testing.T) {
	var mu sync.Mutex
	free := uint64(1 << 30)
	f := newFixture(t, 0, func(c *Config) {
		c.MinFree = MinFree{Percent: 10}
		c.Free = func() (uint64, uint64, error) {
			mu.Lock()
			defer mu.Unlock()
			return free, 5000 * kib, nil // 10 %: 500 KiB, and 50 KiB more once triggered
		}
	})
	a, b := f.put(100*kib), f.put(100*kib)
	f.s.evictAhead(context.Background())
	f.wantStored(map[digest.Digest]bool{a: true, b: true})
	mu.Lock()
	free = 450 * kib // 50 KiB short: 100 KiB to free, one blob
	mu.Unlock()
	f.s.evictAhead(context.Background())
	f.wantStored(map[digest.Digest]bool{a: false, b: true})
	if got := testutil.ToFloat64(f.m.Evictions.WithLabelValues(triggerMinFree)); got != 1 {
		t.Fatalf("min-free evictions = %v", got)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 10 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Records learned for a blob that never arrives are removed after the grace; a tag
// record goes with the manifest it names and moves with the tag.
func TestRecordsGoWithTheirBlob(t *testing.T) {
	f := newFixture(t, 480*kib)
	ctx := context.Background()
	never := digest.FromString("never stored")
	mkey := "membership/reg.example/team/app/@" + never.String()
	if err := f.s.PutRecord(ctx, mkey, nil); err != nil {
		t.Fatal(err)
	}
	a := f.put(100 * kib)
	tag := "tag/reg.example/team/app/@v1"
	putTag(t, f.s, tag, a)
	f.clk.Advance(5 * time.Minute)
	f.s.expirePending(ctx)
	if _, err := f.inner.GetRecord(ctx, mkey); err != nil {
		t.Fatalf("pending membership removed before its grace: %v", err)
	}
	f.clk.Advance(6 * time.Minute)
	f.s.expirePending(ctx)
	if _, err := f.inner.GetRecord(ctx, mkey); !errdefs.IsNotFound(err) {
		t.Fatalf("pending membership after the grace: %v", err)
	}
	b := f.put(100 * kib)
	putTag(t, f.s, tag, b) // the tag moved: it now goes with b
	f.s.evictOne(ctx, a, anyAtime, triggerMaxSize)
	if _, err := f.inner.GetRecord(ctx, tag); err != nil {
		t.Fatalf("tag record removed with its old manifest: %v", err)
	}
	f.s.evictOne(ctx, b, anyAtime, triggerMaxSize)
	if _, err := f.inner.GetRecord(ctx, tag); !errdefs.IsNotFound(err) {
		t.Fatalf("tag record outlived its manifest: %v", err)
	}
	if used := f.s.Used(); used != 0 {
		t.Fatalf("used = %d after evicting everything", used)
	}
}

func putTag(t *testing.T, s storage.Driver, key string, d digest.Digest) {
	t.Helper()
	b, _ := json.Marshal(map[string]any{"digest": d, "mediaType": "application/vnd.oci.image.manifest.v1+json"})
	if err := s.PutRecord(context.Background(), key, b); err != nil {
		t.Fatal(err)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"500GiB": 500 << 30, "100MiB": 100 << 20, "4096": 4096, "1.5KiB": 1536, "2 TiB": 2 << 40, "7B": 7} {
		got, err := ParseSize(in)
		if err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "10GB", "-1MiB", "MiB", "1e400"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) accepted", in)
		}
	}
	if m, err := ParseMinFree("15%"); err != nil || m.Percent != 15 {
		t.Errorf("ParseMinFree(15%%) = %+v, %v", m, err)
	}
	if m, err := ParseMinFree("20GiB"); err != nil || m.Bytes != 20<<30 {
		t.Errorf("ParseMinFree(20GiB) = %+v, %v", m, err)
	}
	if _, err := ParseMinFree("100%"); err == nil {
		t.Error("ParseMinFree(100%) accepted")
	}
}

// A fill's reservation ends when its blob is stored: the bytes are counted once.
func TestReservationEndsAtCommit(t *testing.T) {
	f := newFixture(t, 480*kib)
	ctx := context.Background()
	b, d := randomBlob(100 * kib)
	release, err := f.s.Reserve(ctx, fill.Key{Registry: "reg.example", Digest: d}, int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	if used := f.s.Used(); used != 108*kib {
		t.Fatalf("used with the reservation = %d KiB, want 108", used/kib)
	}
	if err := f.s.Put(ctx, d, int64(len(b)), bytes.NewReader(b)); err != nil {
		t.Fatal(err)
	}
	if used := f.s.Used(); used != 100*kib {
		t.Fatalf("used once stored = %d KiB, want 100 (counted once)", used/kib)
	}
	release(true)
	if used := f.s.Used(); used != 100*kib {
		t.Fatalf("used after release = %d KiB, want 100", used/kib)
	}
}

// A blob stat-ed after the evictor listed its candidates (the server stats before it
// opens) is not evicted by that round.
func TestStatBeforeOpenKeepsBlob(t *testing.T) {
	f := newFixture(t, 0)
	ctx := context.Background()
	a := f.put(100 * kib)
	f.s.mu.Lock()
	listed := f.s.blobs[a].atime
	f.s.mu.Unlock()
	f.clk.Advance(time.Second)
	if _, err := f.s.Stat(ctx, a); err != nil {
		t.Fatal(err)
	}
	if freed := f.s.evictOne(ctx, a, listed, triggerMaxSize); freed != 0 {
		t.Fatal("a blob used since it was listed was evicted")
	}
	f.wantStored(map[digest.Digest]bool{a: true})
}

// A fill's blob adopted held is not evicted while its clients still read the spool (on a
// filesystem the stored blob's own inode: deleted, its blocks would stay allocated past
// the bound until they finish); once released it may go.
func TestAdoptedHeldBlobIsNotEvicted(t *testing.T) {
	f := newFixture(t, 480*kib)
	ctx := context.Background()
	b, d := randomBlob(100 * kib)
	spool := filepath.Join(t.TempDir(), "spool")
	if err := os.WriteFile(spool, b, 0o600); err != nil {
		t.Fatal(err)
	}
	release, err := f.s.AdoptFileHeld(ctx, d, int64(len(b)), spool)
	if err != nil {
		t.Fatal(err)
	}
	f.clk.Advance(time.Second)
	other := f.put(100 * kib) // newer: the held blob is the least recently used
	if freed := f.s.evictBytes(ctx, 1, triggerMaxSize); freed == 0 {
		t.Fatal("nothing evicted")
	}
	if !f.stored(d) || f.stored(other) {
		t.Fatalf("held blob stored = %v, newer blob stored = %v: eviction took the held one", f.stored(d), f.stored(other))
	}
	release()
	release() // once only: a second call must not free another reader's hold
	f.s.mu.Lock()
	refs := f.s.blobs[d].refs
	f.s.mu.Unlock()
	if refs != 0 {
		t.Fatalf("refs after release = %d, want 0", refs)
	}
	if freed := f.s.evictBytes(ctx, 1, triggerMaxSize); freed == 0 || f.stored(d) {
		t.Fatal("the released blob was not evicted")
	}
}

// Evictions that start at once (the background evictor, a fill short of room, a manifest
// Put) free the excess once between them: each counts it under evictMu.
func TestEvictionsAtOnceFreeTheExcessOnce(t *testing.T) {
	f := newFixture(t, 2000*kib) // high 1800 KiB, low 1600 KiB
	for range 16 {               // 16 x 116 KiB = 1856 KiB
		f.put(100 * kib)
	}
	ctx := context.Background()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%2 == 0 {
				f.s.evictAhead(ctx)
			} else {
				f.s.evictFor(ctx, 100*kib)
			}
		}()
	}
	wg.Wait()
	// Down to the low watermark (at most 2 blobs), and the 108 KiB room asked for once.
	if used := f.s.Used(); used < 1600*kib-2*116*kib {
		t.Fatalf("used %d KiB after evictions at once: the excess was freed more than once (%v evictions)",
			used/kib, testutil.ToFloat64(f.m.Evictions.WithLabelValues(triggerMaxSize)))
	}
}

// gatedDelete is a driver whose Delete waits until the test opens the gate: a disk slow
// to unlink, or an eviction caught between its choice and the unlink.
type gatedDelete struct {
	*filesystem.Driver
	entered chan digest.Digest
	gate    chan struct{}
}

func (g *gatedDelete) Delete(ctx context.Context, d digest.Digest) error {
	g.entered <- d
	<-g.gate
	return g.Driver.Delete(ctx, d)
}

// An evicted blob's bytes count against the bound until its file is deleted: a fill
// that reserves meanwhile waits for the deletion, rather than spool beside a file the
// disk still holds (the disk past the bound).
func TestEvictedBlobCountsUntilDeleted(t *testing.T) {
	f := newFixture(t, 480*kib)
	ctx := context.Background()
	for range 4 { // 4 x 116 KiB = 464 KiB
		f.put(100 * kib)
	}
	inner := &gatedDelete{Driver: f.inner, entered: make(chan digest.Digest, 8), gate: make(chan struct{})}
	s := f.openOn(inner, 480*kib)
	s.reconcile(ctx) // the four blobs, walked
	before := s.Used()

	reserved := make(chan error, 2)
	reserve := func(name string) {
		_, err := s.Reserve(ctx, fill.Key{Registry: "reg.example", Digest: digest.FromString(name)}, 100*kib)
		reserved <- err
	}
	go reserve("first") // needs one blob's room: evicts one
	victim := <-inner.entered
	if used := s.Used(); used < before {
		close(inner.gate)
		t.Fatalf("used %d KiB while %s is still on disk, %d KiB before: its bytes were counted as freed before they were", used/kib, victim.Encoded()[:8], before/kib)
	}
	go reserve("second") // waits for the deletion, then needs a second blob's room
	select {
	case err := <-reserved:
		close(inner.gate)
		t.Fatalf("a reservation returned (%v) while the blob it needs the room of is still on disk", err)
	case <-inner.entered:
		t.Fatal("a second deletion started while the first was in flight")
	case <-time.After(200 * time.Millisecond): // a pass here can only be late, never wrong
	}
	close(inner.gate)
	for range 2 {
		if err := <-reserved; err != nil {
			t.Fatalf("reservation: %v", err)
		}
	}
	if used := s.Used(); used > 480*kib {
		t.Fatalf("used %d KiB past the 480 KiB bound", used/kib)
	}
}
