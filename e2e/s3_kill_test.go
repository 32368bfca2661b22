package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/cove-oci/cove/internal/peers"
)

// kill -9 of a cove-cache on S3 while it uploads a verified fill (a multipart upload in
// progress): the bucket then holds no object for the blob, or the whole right one, never
// a part; the restarted process serves the blob right, and its spool is empty.
func TestKillDuringS3Upload(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/s3kill:v1", 1, 160<<20) // ten parts
	layer := img.Layers[0]
	key := "blobs/" + strings.Replace(layer, ":", "/", 1)
	m := peers.StartMinIO(t)
	m.SetEnv(t)
	dir := t.TempDir()
	cove := peers.StartCove(t, dir, "--origin-plain-http", origin.Addr, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket)
	client, err := m.Client()
	if err != nil {
		t.Fatal(err)
	}
	blobURL := func() string { // the port changes on restart
		return cove.URL + "/v2/team/s3kill/blobs/" + layer + "?ns=" + url.QueryEscape(origin.Addr)
	}

	// The client reads the whole blob; the upload to S3 starts after its last byte.
	if got := fetchDigest(t, blobURL()); got != layer {
		t.Fatalf("cold GET: digest %s", got)
	}
	deadline := time.Now().Add(30 * time.Second)
	for !uploading(ctx, client, m.Bucket, key) {
		if _, err := client.StatObject(ctx, m.Bucket, key, minio.StatObjectOptions{}); err == nil {
			t.Fatal("the upload finished before the test saw it in progress: make the blob larger")
		}
		if time.Now().After(deadline) {
			t.Fatalf("no upload of %s in progress after 30 s\n%s", key, s3LogTail(cove.LogPath))
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // some parts in
	cove.Kill9()

	if obj, err := client.GetObject(ctx, m.Bucket, key, minio.GetObjectOptions{}); err == nil {
		h := sha256.New()
		n, err := io.Copy(h, obj)
		obj.Close()
		if err == nil {
			if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != layer {
				t.Fatalf("after kill -9 the bucket holds %d bytes of a wrong blob %s", n, got)
			}
			t.Log("the upload completed before the kill; the object is whole and right")
		} else if minio.ToErrorResponse(err).Code != "NoSuchKey" {
			t.Fatalf("reading the object after kill -9: %v", err)
		}
	}
	if !uploading(ctx, client, m.Bucket, key) {
		t.Log("no incomplete upload left (completed before the kill)")
	}

	cove.Restart(t)
	if ents, _ := os.ReadDir(filepath.Join(dir, "spool")); len(ents) != 0 {
		t.Fatalf("spool/ has %d leftovers after restart", len(ents))
	}
	if got := fetchDigest(t, blobURL()); got != layer {
		t.Fatalf("after restart: digest %s", got)
	}
	waitObjects(t, ctx, m, []string{layer})
}

// uploading reports whether a multipart upload of key is in progress.
func uploading(ctx context.Context, c *minio.Client, bucket, key string) bool {
	for u := range c.ListIncompleteUploads(ctx, bucket, key, false) {
		if u.Err == nil && u.Key == key {
			return true
		}
	}
	return false
}

// fetchDigest GETs u and returns the digest of the body.
func fetchDigest(t *testing.T, u string) string {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", u, resp.Status)
	}
	h := sha256.New()
	if _, err := io.Copy(h, resp.Body); err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}
