package s3_test

import (
	"bytes"
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/storage/s3"
)

// TestStaleUploadsAborted: New aborts the incomplete uploads under blobs/ that a killed
// process left (older than StaleUploadAge), and leaves younger ones (another replica's,
// in progress) and those outside blobs/ alone.
func TestStaleUploadsAborted(t *testing.T) {
	m := peers.StartMinIO(t)
	useEnvCredentials(t, m)
	c, err := m.Client()
	if err != nil {
		t.Fatal(err)
	}
	core := minio.Core{Client: c}
	ctx := context.Background()
	begin := func(key string) {
		t.Helper()
		id, err := core.NewMultipartUpload(ctx, m.Bucket, key, minio.PutObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		part := bytes.Repeat([]byte("x"), 5<<20)
		if _, err := core.PutObjectPart(ctx, m.Bucket, key, id, 1, bytes.NewReader(part), int64(len(part)), minio.PutObjectPartOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	begin("blobs/sha256/" + strings.Repeat("a", 64))
	begin("elsewhere/x")
	time.Sleep(2 * time.Second)
	begin("blobs/sha256/" + strings.Repeat("b", 64)) // young: in progress elsewhere
	if _, err := s3.New(ctx, s3.Config{Endpoint: m.Endpoint, Bucket: m.Bucket, StaleUploadAge: 1500 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	var left []string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		left = left[:0]
		for u := range c.ListIncompleteUploads(ctx, m.Bucket, "", true) {
			if u.Err != nil {
				t.Fatal(u.Err)
			}
			left = append(left, u.Key)
		}
		if len(left) == 2 {
			break
		}
	}
	slices.Sort(left)
	want := []string{"blobs/sha256/" + strings.Repeat("b", 64), "elsewhere/x"}
	if len(left) != 2 || left[0] != want[0] || left[1] != want[1] {
		t.Fatalf("incomplete uploads left: %v, want %v", left, want)
	}
}
