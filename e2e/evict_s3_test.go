package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/cove-oci/cove/internal/peers"
)

// bucketObjects lists the bucket: every object's size by key.
func bucketObjects(t *testing.T, ctx context.Context, m *peers.MinIO) map[string]int64 {
	t.Helper()
	c, err := m.Client()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for o := range c.ListObjects(ctx, m.Bucket, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		out[o.Key] = o.Size
	}
	return out
}

func blobKey(d string) string { return "blobs/" + strings.Replace(d, ":", "/", 1) }

// Eviction on S3 storage, through the driver interface only (pins, records, the index): a 40 MiB bound while 60 MiB
// of images are pulled; the bucket never holds more, the pinned image stays, the least
// recently used image goes with its records and pulls again; a restart reads the index
// from the bucket without listing it.
func TestEvictionOnS3KeepsPinsAndIndex(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	origin := peers.StartRegistry(t)
	pinned := peers.PushRandomImage(t, origin.Addr, "base/runtime:v1", 2, 4<<20)
	var imgs []peers.Image
	for _, name := range []string{"a", "b", "c", "d"} {
		imgs = append(imgs, peers.PushRandomImage(t, origin.Addr, "team/"+name+":v1", 3, 4<<20))
	}
	m := peers.StartMinIO(t)
	m.SetEnv(t)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket,
		"--storage-max-size", "40MiB", "--pin", origin.Addr+"/base/runtime:v1")
	const bound = 40 << 20
	pull := func(img peers.Image) {
		t.Helper()
		n := peers.StartContainerd(t, peers.WithMirror(cove.URL))
		if err := n.Pull(ctx, img.Ref); err != nil {
			t.Fatalf("pull %s: %v", img.Ref, err)
		}
		peers.CheckPulled(t, ctx, n, img)
		n.Stop()
	}
	var largest int64
	measure := func() {
		var total int64
		for _, size := range bucketObjects(t, ctx, m) {
			total += size
		}
		largest = max(largest, total)
	}
	pull(pinned)
	for _, img := range imgs {
		pull(img)
		measure()
	}
	t.Logf("largest bucket size after a pull: %.1f MiB (bound 40 MiB); evictions %v (%.1f MiB)", float64(largest)/(1<<20),
		cove.Metric(t, "cove_store_evictions_total"), cove.Metric(t, "cove_store_evicted_bytes_total")/(1<<20))
	if largest > bound {
		t.Errorf("the bucket held %d bytes, over the bound", largest)
	}
	objs := bucketObjects(t, ctx, m)
	for _, d := range append([]string{pinned.Digest, pinned.Config}, pinned.Layers...) {
		if _, ok := objs[blobKey(d)]; !ok {
			t.Errorf("pinned blob %s is not in the bucket", d)
		}
	}
	first := imgs[0]
	if _, ok := objs[blobKey(first.Layers[0])]; ok {
		t.Fatalf("the least recently used image's layer %s is still in the bucket", first.Layers[0])
	}
	for key := range objs {
		if strings.Contains(key, strings.TrimPrefix(first.Layers[0], "sha256:")) {
			t.Errorf("object %s outlived its evicted blob", key)
		}
	}
	pull(first)

	cove.Restart(t)
	if got := cove.Metric(t, "cove_store_walked_blobs_total"); got != 0 {
		t.Errorf("%v blobs listed at start-up, want 0: the index is in the bucket", got)
	}
	if got := cove.Metric(t, "cove_store_blobs"); got == 0 {
		t.Error("no blobs known after the restart")
	}
}
