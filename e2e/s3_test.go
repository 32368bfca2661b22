package e2e

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/cove-oci/cove/internal/peers"
)

// A cove-cache storing in S3 (a real MinIO) serves containerd's pulls: cold, then warm
// with no blob fetched from the origin, then warm again from a new cove-cache process with
// an empty --storage-dir over the same bucket (a rescheduled pod): the blobs live in the
// bucket, not on the local disk. Every layer (20 MiB) is larger than a multipart part.
// The credentials reach cove-cache only through the AWS environment variables and never
// appear in its log.
func TestPullThroughCacheOnS3(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/s3app:v1", 3, 20<<20)
	m := peers.StartMinIO(t)
	// cove-cache inherits the test's environment: the standard AWS variables, nothing else.
	m.SetEnv(t)
	flags := []string{"--origin-plain-http", origin.Addr, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket, "--log-level", "debug"}
	cove := peers.StartCove(t, "", flags...)

	cold := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := cold.Pull(ctx, img.Ref); err != nil {
		t.Fatalf("cold pull: %v\n%s", err, s3LogTail(cove.LogPath))
	}
	peers.CheckPulled(t, ctx, cold, img)
	afterCold := origin.BlobGETs()
	for _, d := range allBlobs(img) {
		if afterCold[d] != 1 {
			t.Errorf("origin GETs of %s after the cold pull = %d, want 1", d, afterCold[d])
		}
	}
	if misses := cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="miss"`); misses < float64(len(allBlobs(img))) {
		t.Fatalf("cove-cache saw %v blob misses: the pull did not go through it", misses)
	}
	// Every blob is in the bucket; none is on the local disk.
	waitObjects(t, ctx, m, allBlobs(img))
	if _, err := os.Stat(filepath.Join(cove.StorageDir, "blobs")); !os.IsNotExist(err) {
		t.Errorf("the local --storage-dir has a blobs directory (%v): it should hold in-flight fills only", err)
	}

	pullWarm := func(name string, c *peers.Cove) {
		t.Helper()
		before := origin.BlobGETs()
		node := peers.StartContainerd(t, peers.WithMirror(c.URL))
		if err := node.Pull(ctx, img.Ref); err != nil {
			t.Fatalf("%s pull: %v\n%s", name, err, s3LogTail(c.LogPath))
		}
		peers.CheckPulled(t, ctx, node, img)
		after := origin.BlobGETs()
		for _, d := range allBlobs(img) {
			if after[d] != before[d] {
				t.Errorf("%s pull: %d origin GETs of %s, want 0", name, after[d]-before[d], d)
			}
		}
		if hits := c.Metric(t, "cove_requests_total", `operation="blob"`, `result="hit"`); hits < float64(len(allBlobs(img))) {
			t.Errorf("%s pull: %v blob hits, want at least %d", name, hits, len(allBlobs(img)))
		}
		if sent := c.Metric(t, "cove_bytes_sent_total", `source="cache"`); sent < float64(img.Size) {
			t.Errorf("%s pull: %v bytes sent from the cache, want at least %d", name, sent, img.Size)
		}
	}
	pullWarm("warm", cove)
	// Rescheduled: the process goes, a new one starts on an empty local directory and the
	// same bucket (one running cove-cache per bucket: docs/configuration.md).
	cove.Stop()
	other := peers.StartCove(t, "", flags...)
	pullWarm("warm from a rescheduled cove-cache", other)

	for _, c := range []*peers.Cove{cove, other} {
		c.Stop()
		logs, err := os.ReadFile(c.LogPath)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(logs), m.SecretKey) {
			t.Fatal("the S3 secret key appears in cove-cache's log")
		}
		if !strings.Contains(string(logs), `"storage":"s3"`) {
			t.Errorf("cove-cache's start-up line does not say it stores in S3:\n%s", s3LogTail(c.LogPath))
		}
	}
}

// waitObjects checks that blobs/sha256/<hex> exists in the bucket for every digest. A
// fill is stored after its last byte went to the client, so a moment may pass.
func waitObjects(t *testing.T, ctx context.Context, m *peers.MinIO, digests []string) {
	t.Helper()
	c, err := m.Client()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range digests {
		key := "blobs/" + strings.Replace(d, ":", "/", 1)
		var err error
		for range 100 {
			if _, err = c.StatObject(ctx, m.Bucket, key, minio.StatObjectOptions{}); err == nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			t.Errorf("%s is not in the bucket: %v", key, err)
		}
	}
}

// s3LogTail is the last lines of a log, for failure messages.
func s3LogTail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-30):], "\n")
}

// S3 goes away under a running cove-cache: pulls through it still succeed, served by
// cove-cache from its fills (not by containerd falling back), within seconds rather
// than retries per request; /readyz says 503. When S3 is back, with no restart of
// cove-cache, blobs are stored again and the next pull costs the origin no blob GET.
func TestS3DownThenBack(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/s3down:v1", 3, 4<<20)
	m := peers.StartMinIO(t)
	m.SetEnv(t)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket)

	m.Stop()
	start := time.Now()
	node := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := node.Pull(ctx, img.Ref); err != nil {
		t.Fatalf("pull with S3 down: %v\n%s", err, s3LogTail(cove.LogPath))
	}
	took := time.Since(start)
	peers.CheckPulled(t, ctx, node, img)
	t.Logf("pull with S3 down took %v", took)
	if took > 4*time.Second { // 1.1 s here; 6.3 s when every request waited for its retries
		t.Errorf("pull with S3 down took %v: the store's failures cost more than cache hits", took)
	}
	if sent := cove.Metric(t, "cove_bytes_sent_total", `source="fill"`); sent < float64(img.Size) {
		t.Errorf("cove-cache sent %v bytes from fills, want at least %d: the pull went round it", sent, img.Size)
	}
	if code := s3Readyz(t, cove); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz with S3 down: %d, want 503", code)
	}

	m.Restart(t)
	deadline := time.Now().Add(15 * time.Second)
	for s3Readyz(t, cove) != http.StatusOK {
		if time.Now().After(deadline) {
			t.Fatalf("/readyz not 200 15 s after S3 came back\n%s", s3LogTail(cove.LogPath))
		}
		time.Sleep(100 * time.Millisecond)
	}
	node = peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := node.Pull(ctx, img.Ref); err != nil {
		t.Fatalf("pull after S3 came back: %v\n%s", err, s3LogTail(cove.LogPath))
	}
	waitObjects(t, ctx, m, allBlobs(img))
	before := origin.BlobGETs()
	node = peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := node.Pull(ctx, img.Ref); err != nil {
		t.Fatalf("warm pull: %v", err)
	}
	peers.CheckPulled(t, ctx, node, img)
	after := origin.BlobGETs()
	for _, d := range allBlobs(img) {
		if after[d] != before[d] {
			t.Errorf("warm pull after S3 came back: %d origin GETs of %s, want 0", after[d]-before[d], d)
		}
	}
}

func s3Readyz(t *testing.T, c *peers.Cove) int {
	t.Helper()
	resp, err := http.Get(c.URL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}
