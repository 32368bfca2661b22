package evict

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Access times survive a restart with no walk of the store: the second Store reads the
// index record alone, and evicts in the order the first one saw.
func TestAccessTimesSurviveRestart(t *testing.T) {
	f := newFixture(t, 480*kib)
	ctx := context.Background()
	f.s.Start(ctx)
	a, b, c := f.put(100*kib), f.put(100*kib), f.put(100*kib)
	f.touch(a) // order now: b, c, a
	used := f.s.storedBytes()
	if err := f.s.Close(ctx); err != nil {
		t.Fatal(err)
	}

	f.s = f.open(480 * kib)
	f.s.Start(ctx)
	defer f.s.Close(ctx)
	if got := testutil.ToFloat64(f.m.WalkedBlobs); got != 0 {
		t.Fatalf("blobs walked at a clean start = %v, want 0", got)
	}
	if got := f.s.storedBytes(); got != used {
		t.Fatalf("used after restart = %d, want %d", got, used)
	}
	f.s.evictBytes(ctx, 1, triggerMaxSize)
	f.wantStored(map[digest.Digest]bool{a: true, b: false, c: true})
	f.s.evictBytes(ctx, 1, triggerMaxSize)
	f.wantStored(map[digest.Digest]bool{a: true, c: false})
}

// After a crash (the index was last written unclean) the index still gives the access
// times, and a background walk adds what was stored after its last write.
func TestUncleanIndexIsReconciled(t *testing.T) {
	f := newFixture(t, 0)
	ctx := context.Background()
	f.s.Start(ctx)
	a := f.put(100 * kib)
	if err := f.s.writeIndex(ctx, false); err != nil { // the periodic write
		t.Fatal(err)
	}
	b := f.put(100 * kib) // stored after it: a crash now loses it from the index
	f.s.cancel()          // the process dies: no clean write
	<-f.s.done

	f.s = f.open(0)
	f.s.Start(ctx)
	defer f.s.Close(ctx)
	waitFor(t, func() bool { return testutil.ToFloat64(f.m.WalkedBlobs) == 2 })
	waitFor(t, func() bool { return f.s.storedBytes() == 2*116*kib })
	f.s.mu.Lock()
	ea, eb := f.s.blobs[a], f.s.blobs[b]
	f.s.mu.Unlock()
	if ea == nil || eb == nil || ea.atime >= eb.atime {
		t.Fatalf("a's access time from the index, b's from the walk: %+v %+v", ea, eb)
	}
}

// A corrupt index is rebuilt by a walk; records whose blob is gone and legacy records
// are removed, records of stored blobs are kept and go with them again.
func TestCorruptIndexRebuilt(t *testing.T) {
	f := newFixture(t, 0)
	ctx := context.Background()
	a := f.put(100 * kib)
	gone := digest.FromString("gone")
	orphans := []string{
		"provenance/sha256/" + gone.Encoded() + "/reg.example",
		"manifesttype/sha256/" + gone.Encoded() + "/reg.example",
		"membership/reg.example/team/app/@" + gone.String(),
		"member/reg.example/team/app/" + gone.Encoded(),
		"manifest/sha256/" + gone.Encoded(),
	}
	for _, k := range orphans {
		if err := f.inner.PutRecord(ctx, k, []byte("{}")); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.inner.PutRecord(ctx, IndexKey, []byte("not gzip")); err != nil {
		t.Fatal(err)
	}
	f.s = f.open(0)
	f.s.Start(ctx)
	defer f.s.Close(ctx)
	waitFor(t, func() bool { return testutil.ToFloat64(f.m.RecordsCollected.WithLabelValues("legacy")) == 2 })
	for _, k := range orphans {
		if _, err := f.inner.GetRecord(ctx, k); !errdefs.IsNotFound(err) {
			t.Errorf("record %s: %v, want removed", k, err)
		}
	}
	if got := testutil.ToFloat64(f.m.RecordsCollected.WithLabelValues("orphan")); got != 3 {
		t.Errorf("orphans removed = %v, want 3", got)
	}
	f.wantStored(map[digest.Digest]bool{a: true})
	f.s.evictOne(ctx, a, anyAtime, triggerMaxSize)
	f.wantStored(map[digest.Digest]bool{a: false}) // its records went with it
}

// Pinned tags keep their manifests and everything they list, index children included;
// when the tag moves, the old image may go.
func TestPins(t *testing.T) {
	f := newFixture(t, 0, func(c *Config) { c.Pins = []string{"reg.example/team/*:v1"} })
	ctx := context.Background()
	f.s.Start(ctx)
	defer f.s.Close(ctx)
	cfg, layer := f.put(10*kib), f.put(100*kib)
	manifest := f.putManifest(ocispec.Manifest{
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: cfg, Size: 10 * kib},
		Layers:    []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: layer, Size: 100 * kib}},
	})
	index := f.putManifest(ocispec.Index{
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageManifest, Digest: manifest}},
	})
	other := f.put(100 * kib)
	putTag(t, f.s, "tag/reg.example/team/app/@v1", index)
	putTag(t, f.s, "tag/reg.example/team/app/@v2", other) // not pinned
	f.s.resolvePinsIfDirty(ctx)

	f.s.evictBytes(ctx, 1<<40, triggerMaxSize) // evict everything that may go
	f.wantStored(map[digest.Digest]bool{cfg: true, layer: true, other: false})
	for _, d := range []digest.Digest{manifest, index} {
		if !f.stored(d) {
			t.Errorf("pinned manifest %s evicted", d)
		}
	}
	if got := testutil.ToFloat64(f.m.PinnedBytes); got < 110*kib {
		t.Errorf("pinned bytes = %v", got)
	}

	moved := f.put(100 * kib)
	putTag(t, f.s, "tag/reg.example/team/app/@v1", moved)
	f.s.evictBytes(ctx, 1<<40, triggerMaxSize)
	f.wantStored(map[digest.Digest]bool{cfg: false, layer: false, moved: true})
}

func (f *fixture) putManifest(v any) digest.Digest {
	f.t.Helper()
	b, _ := json.Marshal(v)
	d := digest.FromBytes(b)
	ctx := context.Background()
	f.clk.Advance(time.Second)
	if err := f.s.Put(ctx, d, int64(len(b)), bytes.NewReader(b)); err != nil {
		f.t.Fatal(err)
	}
	var desc ocispec.Descriptor
	json.Unmarshal(b, &desc)
	rec, _ := json.Marshal(map[string]string{"mediaType": desc.MediaType})
	if err := f.s.PutRecord(ctx, "manifesttype/sha256/"+d.Encoded()+"/reg.example", rec); err != nil {
		f.t.Fatal(err)
	}
	return d
}

func TestTagReference(t *testing.T) {
	for key, want := range map[string]string{
		"tag/reg.example/team/app/@v1":      "reg.example/team/app:v1",
		"tag/127.0.0.1:5000/a/@latest":      "127.0.0.1:5000/a:latest",
		"tag/+::1+:5000/library/x/@1.2":     "[::1]:5000/library/x:1.2",
		"tag/docker.io/library/nginx/@1.27": "docker.io/library/nginx:1.27",
	} {
		if got, ok := tagReference(key); !ok || got != want {
			t.Errorf("tagReference(%q) = %q, %v; want %q", key, got, ok, want)
		}
	}
	ps, err := newPinSet([]string{"docker.io/library/nginx", "127.0.0.1:5000/*/*:v?"})
	if err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]bool{
		"tag/docker.io/library/nginx/@1.27": true,
		"tag/docker.io/library/redis/@7":    false,
		"tag/127.0.0.1:5000/team/app/@v1":   true,
		"tag/127.0.0.1:5000/team/app/@v10":  false,
		"tag/127.0.0.1:5000/app/@v1":        false,
	} {
		if got := ps.matches(key); got != want {
			t.Errorf("matches(%q) = %v, want %v", key, got, want)
		}
	}
	if _, err := newPinSet([]string{"nginx"}); err == nil {
		t.Error("a pin without registry accepted")
	}
	if _, err := newPinSet([]string{"reg/[x"}); err == nil {
		t.Error("a malformed glob accepted")
	}
}

func (s *Store) storedBytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stored
}

// A blob stored after Close wrote the index clean (a fill ending during shutdown) marks
// it unclean again, so the next start walks the store instead of missing the blob.
func TestChangeAfterCloseUnmarksIndex(t *testing.T) {
	f := newFixture(t, 0)
	ctx := context.Background()
	f.s.Start(ctx)
	f.put(100 * kib)
	if err := f.s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	late := f.put(100 * kib)
	f.s = f.open(0)
	f.s.Start(ctx)
	defer f.s.Close(ctx)
	waitFor(t, func() bool { return testutil.ToFloat64(f.m.WalkedBlobs) == 2 })
	waitFor(t, func() bool {
		f.s.mu.Lock()
		defer f.s.mu.Unlock()
		return f.s.blobs[late] != nil
	})
}
