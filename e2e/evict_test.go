package e2e

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

// diskUsage is what the storage directory takes on disk: allocated blocks of every file
// and directory under it (blobs, records, the spool, temporary files), as du counts.
func diskUsage(t *testing.T, dir string) int64 {
	var total int64
	filepath.WalkDir(dir, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return nil // removed while walking
		}
		if fi, err := e.Info(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				total += st.Blocks * 512
			}
		}
		return nil
	})
	return total
}

// tmpfsUsage is what a tmpfs holds, read in one statfs: a snapshot, unlike a walk.
func tmpfsUsage(t *testing.T, dir string) int64 {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Errorf("statfs %s: %v", dir, err)
		return 0
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// storeDir is a storage directory whose usage can be sampled exactly: a tmpfs of its own
// when this process may mount one (one statfs counts every file at one instant), else a
// temporary directory measured by a walk (exact only at rest: while eviction deletes a
// blob and fills spool others, one walk may count the deleted blob and the grown spool).
func storeDir(t *testing.T) (dir string, usage func(*testing.T, string) int64, exact bool) {
	dir, err := peers.TryMountTmpfs(t, "size=1g")
	if err != nil {
		t.Logf("no tmpfs for the store (%v): its usage is sampled by walks", err)
		return t.TempDir(), diskUsage, false
	}
	return dir, tmpfsUsage, true
}

// watchDisk samples usage until stop is called and returns the largest sample.
func watchDisk(t *testing.T, dir string, usage func(*testing.T, string) int64) (stop func() int64) {
	var max int64
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			if u := usage(t, dir); u > max {
				max = u
			}
			select {
			case <-done:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	return func() int64 {
		close(done)
		wg.Wait()
		return max
	}
}

func blobStored(dir, d string) bool {
	dg := digest.Digest(d)
	_, err := os.Stat(filepath.Join(dir, "blobs", dg.Algorithm().String(), dg.Encoded()))
	return err == nil
}

// A 64 MiB store while fresh containerds pull 200 MiB of images through it, one after
// another and five at once (one with a 70 MiB layer, larger than the store): every pull
// verifies, the directory never holds more than the bound, the pinned image stays
// stored, and an evicted image pulls again.
func TestEvictionUnderTinyBound(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const bound = 64 << 20
	origin := peers.StartRegistry(t)
	pinned := peers.PushRandomImage(t, origin.Addr, "base/runtime:v1", 3, 4<<20)
	// One layer larger than the whole store: refused room, served through unstored.
	huge := peers.PushRandomImage(t, origin.Addr, "team/huge:v1", 1, 70<<20)
	var imgs []peers.Image
	for _, name := range []string{"a", "b", "c", "d", "e", "f", "g"} {
		imgs = append(imgs, peers.PushRandomImage(t, origin.Addr, "team/"+name+":v1", 3, 5<<20))
	}
	dir, usage, exact := storeDir(t)
	cove := peers.StartCove(t, dir, "--origin-plain-http", origin.Addr,
		"--storage-max-size", "64MiB", "--pin", origin.Addr+"/base/*:v1")
	stop := watchDisk(t, dir, usage)

	pull := func(img peers.Image) {
		c := peers.StartContainerd(t, peers.WithMirror(cove.URL))
		if err := c.Pull(ctx, img.Ref); err != nil {
			t.Errorf("pull %s: %v", img.Ref, err)
			return
		}
		peers.CheckPulled(t, ctx, c, img)
		c.Stop()
	}
	pull(pinned)
	for _, img := range imgs[:3] { // one after another
		pull(img)
	}
	var wg sync.WaitGroup
	for _, img := range append(imgs[3:], huge) { // five at once
		wg.Add(1)
		go func() { defer wg.Done(); pull(img) }()
	}
	wg.Wait()
	if blobStored(dir, huge.Layers[0]) {
		t.Errorf("a layer larger than the bound was stored")
	}
	if cove.Metric(t, "cove_store_reservations_refused_total") == 0 {
		t.Errorf("the layer larger than the bound was not refused a reservation")
	}
	max := stop()
	t.Logf("largest on-disk size of the store: %.1f MiB (bound %d MiB); evictions %v (%.1f MiB); refused reservations %v; stored now %.1f MiB",
		float64(max)/(1<<20), bound>>20, cove.Metric(t, "cove_store_evictions_total"),
		cove.Metric(t, "cove_store_evicted_bytes_total")/(1<<20), cove.Metric(t, "cove_store_reservations_refused_total"),
		cove.Metric(t, "cove_store_bytes")/(1<<20))
	// On a tmpfs every sample is exact, and so is the bound. A walk is not a snapshot:
	// with five fills at once, one walk can count blobs eviction deleted behind it and
	// spools that grew ahead of it (make test saw 8.5 MiB over), so walked samples only
	// bound the peak loosely; at rest a walk is exact too.
	slack := int64(0)
	if !exact {
		slack = 5 * 5 << 20
	}
	if max > bound+slack {
		t.Errorf("the store held %d bytes on disk, over the %d-byte bound", max, bound)
	}
	waitFillsDone(t, cove)
	if now := usage(t, dir); now > bound {
		t.Errorf("at rest the store holds %d bytes on disk, over the %d-byte bound", now, bound)
	}
	if cove.Metric(t, "cove_store_evictions_total") == 0 {
		t.Fatal("nothing was evicted: the test did not fill the store")
	}
	for _, d := range append([]string{pinned.Digest, pinned.Config}, pinned.Layers...) {
		if !blobStored(dir, d) {
			t.Errorf("pinned blob %s was evicted", d)
		}
	}
	if got := cove.Metric(t, "cove_store_pinned_bytes"); got < float64(pinned.Size) {
		t.Errorf("cove_store_pinned_bytes = %v, want at least %d", got, pinned.Size)
	}

	// The first image went first (least recently used): it pulls again, refilled.
	evicted := imgs[0]
	if blobStored(dir, evicted.Layers[0]) {
		t.Fatalf("layer %s of the least recently used image is still stored", evicted.Layers[0])
	}
	before := origin.BlobGETs()[evicted.Layers[0]]
	pull(evicted)
	if after := origin.BlobGETs()[evicted.Layers[0]]; after != before+1 {
		t.Errorf("origin GETs of the evicted layer: %d then %d, want one refill", before, after)
	}
	if u := usage(t, dir); u > bound {
		t.Errorf("the store holds %d bytes on disk after the refill, over the bound", u)
	}
	if logs := stray(t, cove, "error"); len(logs) > 0 {
		t.Errorf("cove-cache logged errors: %v", logs)
	}
}

// stray returns cove-cache's log messages at level (an error there is a finding).
func stray(t *testing.T, c *peers.Cove, level string) []string {
	var out []string
	for _, l := range c.Logs(t) {
		if lv, _ := l["level"].(string); strings.EqualFold(lv, level) {
			msg, _ := l["msg"].(string)
			out = append(out, msg)
		}
	}
	return out
}

// Access times survive a restart, read from the index record with no walk of the store:
// after A, B and A again, a restart, then C past the bound, B goes and A stays. The bound
// is set in a --config file.
func TestEvictionOrderSurvivesRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	origin := peers.StartRegistry(t)
	a := peers.PushRandomImage(t, origin.Addr, "team/a:v1", 3, 4<<20)
	b := peers.PushRandomImage(t, origin.Addr, "team/b:v1", 3, 4<<20)
	c := peers.PushRandomImage(t, origin.Addr, "team/c:v1", 3, 4<<20)
	dir := t.TempDir()
	// The bound comes from a configuration file, as an operator would set it.
	config := filepath.Join(t.TempDir(), "cove-cache.toml")
	if err := os.WriteFile(config, []byte("storage_max_size = \"40MiB\"\nlog_level = \"debug\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cove := peers.StartCove(t, dir, "--origin-plain-http", origin.Addr, "--config", config)
	if got := cove.Metric(t, "cove_store_limit_bytes"); got != 40<<20 {
		t.Fatalf("cove_store_limit_bytes = %v: the configuration file was not applied", got)
	}
	pull := func(img peers.Image) {
		n := peers.StartContainerd(t, peers.WithMirror(cove.URL))
		if err := n.Pull(ctx, img.Ref); err != nil {
			t.Fatalf("pull %s: %v", img.Ref, err)
		}
		peers.CheckPulled(t, ctx, n, img)
		n.Stop()
	}
	pull(a)
	pull(b)
	time.Sleep(10 * time.Millisecond)
	pull(a) // served from the cache: A is now more recent than B
	if cove.Metric(t, "cove_store_evictions_total") != 0 {
		t.Fatal("evictions before the bound was reached")
	}

	firstLog := cove.LogPath
	cove.Restart(t) // SIGTERM: the index is written clean
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(firstLog)
			t.Logf("cove-cache's log before the restart:\n%s", b)
		}
	})
	if got := cove.Metric(t, "cove_store_walked_blobs_total"); got != 0 {
		t.Fatalf("%v blobs walked at start-up, want 0 (the index is read instead)", got)
	}
	loaded := false
	for _, l := range cove.Logs(t) {
		if l["msg"] == "eviction index loaded" {
			loaded = true
			if l["blobs"].(float64) < 8 || l["clean"] != true {
				t.Errorf("index loaded with %v blobs, clean %v", l["blobs"], l["clean"])
			}
		}
	}
	if !loaded {
		t.Fatal("no 'eviction index loaded' log line after the restart")
	}

	pull(c) // 3 x 12 MiB + records > 36 MiB (90 %): down to 32 MiB, B first
	deadline := time.Now().Add(10 * time.Second)
	for cove.Metric(t, "cove_store_evictions_total") == 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if cove.Metric(t, "cove_store_evictions_total") == 0 {
		t.Fatal("no eviction past the high watermark")
	}
	goneB := 0
	for _, d := range b.Layers {
		if !blobStored(dir, d) {
			goneB++
		}
	}
	for _, d := range append([]string{a.Digest, a.Config}, a.Layers...) {
		if !blobStored(dir, d) {
			t.Errorf("blob %s of A (used after B, before the restart) was evicted", d)
		}
	}
	if t.Failed() {
		for _, l := range cove.Logs(t) {
			if l["msg"] == "evicted" || l["msg"] == "evicted to the low watermark" {
				t.Logf("%v", l)
			}
		}
	}
	if goneB == 0 {
		t.Errorf("no layer of B (the least recently used) was evicted")
	}
	if got := cove.Metric(t, "cove_store_walked_blobs_total"); got != 0 {
		t.Errorf("%v blobs walked after the restart", got)
	}
}
