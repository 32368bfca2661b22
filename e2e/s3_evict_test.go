package e2e

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/cove-oci/cove/internal/peers"
)

// bucketUsage sums the sizes of every object in the bucket and counts incomplete uploads.
func bucketUsage(t *testing.T, c *minio.Client, bucket string) (bytes int64, incomplete int) {
	ctx := context.Background()
	for o := range c.ListObjects(ctx, bucket, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			t.Errorf("listing the bucket: %v", o.Err)
			return 0, 0
		}
		bytes += o.Size
	}
	for range c.ListIncompleteUploads(ctx, bucket, "", true) {
		incomplete++
	}
	return bytes, incomplete
}

// Eviction bounds a store on S3 as it bounds a filesystem: images larger in total than
// --storage-max-size pulled through a cove-cache on MinIO, one after another and three at
// once, all verify; the bucket never holds more than the bound; the least recently used
// image is evicted and refilled from the origin on its next pull.
func TestEvictionOnS3(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	const bound = 48 << 20
	origin := peers.StartRegistry(t)
	var imgs []peers.Image
	for _, name := range []string{"a", "b", "c", "d", "e", "f"} {
		imgs = append(imgs, peers.PushRandomImage(t, origin.Addr, "team/s3evict-"+name+":v1", 3, 4<<20))
	}
	m := peers.StartMinIO(t)
	m.SetEnv(t)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr, "--s3-endpoint", m.Endpoint,
		"--s3-bucket", m.Bucket, "--storage-max-size", "48MiB")
	client, err := m.Client()
	if err != nil {
		t.Fatal(err)
	}
	// Watch the bucket's size while the pulls run.
	var mu sync.Mutex
	var peak int64
	done := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			n, _ := bucketUsage(t, client, m.Bucket)
			mu.Lock()
			peak = max(peak, n)
			mu.Unlock()
			select {
			case <-done:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()

	pull := func(img peers.Image) {
		c := peers.StartContainerd(t, peers.WithMirror(cove.URL))
		if err := c.Pull(ctx, img.Ref); err != nil {
			t.Errorf("pull %s: %v", img.Ref, err)
			return
		}
		peers.CheckPulled(t, ctx, c, img)
		c.Stop()
	}
	for _, img := range imgs[:3] {
		pull(img)
	}
	var wg sync.WaitGroup
	for _, img := range imgs[3:] {
		wg.Add(1)
		go func() { defer wg.Done(); pull(img) }()
	}
	wg.Wait()
	waitFillsDone(t, cove)
	close(done)
	<-watched
	now, incomplete := bucketUsage(t, client, m.Bucket)
	t.Logf("bucket peak %.1f MiB, now %.1f MiB (bound %d MiB); evictions %v (%.1f MiB)", float64(peak)/(1<<20),
		float64(now)/(1<<20), bound>>20, cove.Metric(t, "cove_store_evictions_total"), cove.Metric(t, "cove_store_evicted_bytes_total")/(1<<20))
	// A listing is not a snapshot: while eviction deletes one blob and a fill completes
	// another, one listing can count both. So the peak seen while pulls run may pass the
	// bound by at most one blob (a 4 MiB layer) without the bucket ever holding it; at
	// rest the bound is exact.
	if peak > bound+4<<20 || now > bound {
		t.Errorf("the bucket held %d bytes (now %d), over the %d-byte bound", peak, now, bound)
	}
	if incomplete > 0 {
		t.Errorf("%d incomplete uploads left in the bucket", incomplete)
	}
	if cove.Metric(t, "cove_store_evictions_total") == 0 {
		t.Fatal("nothing was evicted: the test did not fill the store")
	}
	// The first image went first (least recently used): it pulls again, refilled.
	evicted := imgs[0]
	key := "blobs/" + strings.Replace(evicted.Layers[0], ":", "/", 1)
	if _, err := client.StatObject(ctx, m.Bucket, key, minio.StatObjectOptions{}); err == nil {
		t.Fatalf("layer %s of the least recently used image is still in the bucket", evicted.Layers[0])
	}
	before := origin.BlobGETs()[evicted.Layers[0]]
	pull(evicted)
	if after := origin.BlobGETs()[evicted.Layers[0]]; after != before+1 {
		t.Errorf("origin GETs of the evicted layer: %d then %d, want one refill", before, after)
	}
	if logs := stray(t, cove, "error"); len(logs) > 0 {
		t.Errorf("cove-cache logged errors: %v", logs)
	}
}

// waitFillsDone waits until cove-cache has no fill in flight (the last one stored).
func waitFillsDone(t *testing.T, c *peers.Cove) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for c.Metric(t, "cove_fills_in_flight") != 0 {
		if time.Now().After(deadline) {
			t.Fatal("fills still in flight after a minute")
		}
		time.Sleep(50 * time.Millisecond)
	}
}
