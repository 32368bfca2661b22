package s3_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/minio/minio-go/v7"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/storage"
	"github.com/cove-oci/cove/proxy/storage/s3"
	"github.com/cove-oci/cove/proxy/storage/storagetest"
)

const partSize = 5 << 20 // S3's smallest, so tests go multipart with small blobs

// useEnvCredentials gives the driver m's credentials the way an operator does: the
// standard AWS environment variables, nothing else of the host's.
func useEnvCredentials(t *testing.T, m *peers.MinIO) {
	t.Setenv("AWS_ACCESS_KEY_ID", m.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", m.SecretKey)
	t.Setenv("AWS_SESSION_TOKEN", "")
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_PROFILE", "")
}

var buckets atomic.Int64

// newDriver makes a fresh bucket on m and a driver over it.
func newDriver(t *testing.T, m *peers.MinIO, cfg s3.Config) (*s3.Driver, string) {
	t.Helper()
	bucket := fmt.Sprintf("b%d-%d", time.Now().UnixNano()%1e6, buckets.Add(1))
	if err := m.MakeBucket(context.Background(), bucket); err != nil {
		t.Fatal(err)
	}
	cfg.Endpoint, cfg.Bucket = m.Endpoint, bucket
	if cfg.PartSize == 0 {
		cfg.PartSize = partSize
	}
	d, err := s3.New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("s3.New: %v", err)
	}
	return d, bucket
}

func TestSuite(t *testing.T) {
	m := peers.StartMinIO(t)
	useEnvCredentials(t, m)
	storagetest.Run(t, func(t *testing.T) storage.Driver {
		d, _ := newDriver(t, m, s3.Config{})
		return d
	})
}

// leftovers lists every object and every incomplete multipart upload in bucket.
func leftovers(t *testing.T, m *peers.MinIO, bucket string) []string {
	t.Helper()
	c, err := m.Client()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var out []string
	for o := range c.ListObjects(ctx, bucket, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		out = append(out, "object "+o.Key)
	}
	for u := range c.ListIncompleteUploads(ctx, bucket, "", true) {
		if u.Err != nil {
			t.Fatal(u.Err)
		}
		out = append(out, "incomplete upload "+u.Key)
	}
	return out
}

// TestRejectedUploadLeavesNothing: a multipart upload whose content turns out wrong at
// the last part, or whose source fails midway, or whose context ends, leaves no object
// and no incomplete upload behind.
func TestRejectedUploadLeavesNothing(t *testing.T) {
	m := peers.StartMinIO(t)
	useEnvCredentials(t, m)
	data, dgst := storagetest.RandomBlob(t, 3*partSize+1234) // four parts
	wrong := append(bytes.Clone(data[:len(data)-1]), data[len(data)-1]^1)
	size := int64(len(data))
	cancelled, cancel := context.WithCancel(context.Background())
	cases := []struct {
		name     string
		ctx      context.Context
		size     int64
		r        io.Reader
		mismatch bool
	}{
		{"last byte differs", context.Background(), size, bytes.NewReader(wrong), true},
		{"one byte longer", context.Background(), size - 1, bytes.NewReader(data), true},
		{"longer than said", context.Background(), size, io.MultiReader(bytes.NewReader(data), strings.NewReader("x")), true},
		{"truncated", context.Background(), size, bytes.NewReader(data[:len(data)-10]), true},
		{"source fails midway", context.Background(), size, io.MultiReader(bytes.NewReader(data[:2*partSize+7]), errReader{}), false},
		{"context ends midway", cancelled, size, &cancelAfter{r: bytes.NewReader(data), n: 2 * partSize, cancel: cancel}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			d, bucket := newDriver(t, m, s3.Config{})
			err := d.Put(tc.ctx, dgst, tc.size, tc.r)
			if err == nil {
				t.Fatal("Put succeeded")
			}
			if tc.mismatch && !errdefs.IsFailedPrecondition(err) {
				t.Fatalf("Put: %v, want failed precondition", err)
			}
			if _, err := d.Stat(context.Background(), dgst); !errdefs.IsNotFound(err) {
				t.Fatalf("Stat after a rejected Put: %v", err)
			}
			if left := leftovers(t, m, bucket); len(left) > 0 {
				t.Fatalf("a rejected Put left %v", left)
			}
			// The same driver then stores the right bytes.
			if err := d.Put(context.Background(), dgst, size, bytes.NewReader(data)); err != nil {
				t.Fatalf("Put of the right content: %v", err)
			}
			if left := leftovers(t, m, bucket); len(left) != 1 || !strings.HasPrefix(left[0], "object blobs/sha256/") {
				t.Fatalf("after a good Put the bucket holds %v", left)
			}
		})
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, fmt.Errorf("source broke") }

// cancelAfter cancels its context once n bytes have been read.
type cancelAfter struct {
	r      io.Reader
	n      int
	cancel func()
}

func (c *cancelAfter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if c.n -= n; c.n <= 0 {
		c.cancel()
	}
	return n, err
}

// countingTransport counts requests by method.
type countingTransport struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.mu.Lock()
	c.n[r.Method]++
	c.mu.Unlock()
	return http.DefaultTransport.RoundTrip(r)
}

func (c *countingTransport) take(method string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.n[method]
	c.n = map[string]int{}
	return n
}

// TestRangedReads: ReadAt and Seek read the asked bytes with ranged GETs, across part
// boundaries, and a sequential read in small pieces is one GET, not one per piece.
func TestRangedReads(t *testing.T) {
	m := peers.StartMinIO(t)
	useEnvCredentials(t, m)
	tr := &countingTransport{n: map[string]int{}}
	d, _ := newDriver(t, m, s3.Config{Transport: tr})
	data, dgst := storagetest.RandomBlob(t, 2*partSize+999)
	ctx := context.Background()
	if err := d.Put(ctx, dgst, int64(len(data)), bytes.NewReader(data)); err != nil {
		t.Fatal(err)
	}
	b, err := d.Open(ctx, dgst)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Size() != int64(len(data)) {
		t.Fatalf("Size = %d", b.Size())
	}
	tr.take(http.MethodGet)
	for _, r := range []struct{ off, n int }{{0, 10}, {partSize - 5, 10}, {len(data) - 3, 3}, {12345, 1 << 20}, {2 * partSize, 999}} {
		buf := make([]byte, r.n)
		if n, err := b.ReadAt(buf, int64(r.off)); n != r.n || err != nil && err != io.EOF {
			t.Fatalf("ReadAt(%d, %d) = %d, %v", r.off, r.n, n, err)
		}
		if !bytes.Equal(buf, data[r.off:r.off+r.n]) {
			t.Fatalf("ReadAt(%d, %d): wrong bytes", r.off, r.n)
		}
	}
	if n := tr.take(http.MethodGet); n != 5 {
		t.Errorf("5 ReadAts at other offsets made %d GETs, want 5", n)
	}
	buf := make([]byte, 20)
	if n, err := b.ReadAt(buf, int64(len(data)-10)); n != 10 || err != io.EOF {
		t.Fatalf("ReadAt over the end = %d, %v; want 10, EOF", n, err)
	}
	if n, err := b.ReadAt(buf, int64(len(data))); n != 0 || err != io.EOF {
		t.Fatalf("ReadAt at the end = %d, %v; want 0, EOF", n, err)
	}
	// A range read in 32 KiB pieces, the way the server copies it: one GET.
	tr.take(http.MethodGet)
	off, n := int64(partSize-100), int64(partSize+50)
	var got bytes.Buffer
	if _, err := io.CopyBuffer(&got, io.NewSectionReader(b, off, n), make([]byte, 32<<10)); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), data[off:off+n]) {
		t.Fatal("range read: wrong bytes")
	}
	if g := tr.take(http.MethodGet); g != 1 {
		t.Errorf("a range read in 32 KiB pieces made %d GETs, want 1", g)
	}
	// Seek then Read to the end.
	if _, err := b.Seek(-777, io.SeekEnd); err != nil {
		t.Fatal(err)
	}
	tail, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(tail, data[len(data)-777:]) {
		t.Fatalf("tail after Seek: %d bytes, %v", len(tail), err)
	}
}

// TestStartErrors: a missing bucket, wrong credentials, credentials in the URL and a
// dead endpoint each fail New with a clear error that never holds a secret.
func TestStartErrors(t *testing.T) {
	m := peers.StartMinIO(t)
	useEnvCredentials(t, m)
	ctx := context.Background()
	check := func(t *testing.T, err error, is func(error) bool, want string, secrets ...string) {
		t.Helper()
		if err == nil || !is(err) {
			t.Fatalf("New: %v; want another class of error", err)
		}
		if !strings.Contains(err.Error(), want) {
			t.Errorf("New: %q does not say %q", err, want)
		}
		for _, s := range secrets {
			if strings.Contains(err.Error(), s) {
				t.Errorf("New's error holds a secret: %q", err)
			}
		}
	}
	t.Run("missing bucket", func(t *testing.T) {
		_, err := s3.New(ctx, s3.Config{Endpoint: m.Endpoint, Bucket: "no-such-bucket"})
		check(t, err, errdefs.IsNotFound, `bucket "no-such-bucket" does not exist`, m.SecretKey)
	})
	t.Run("wrong secret", func(t *testing.T) {
		bad := "wrong" + m.SecretKey
		t.Setenv("AWS_SECRET_ACCESS_KEY", bad)
		_, err := s3.New(ctx, s3.Config{Endpoint: m.Endpoint, Bucket: m.Bucket})
		check(t, err, errdefs.IsPermissionDenied, "check the credentials", m.SecretKey, bad)
	})
	t.Run("unknown key", func(t *testing.T) {
		t.Setenv("AWS_ACCESS_KEY_ID", "nobody")
		_, err := s3.New(ctx, s3.Config{Endpoint: m.Endpoint, Bucket: m.Bucket})
		check(t, err, errdefs.IsPermissionDenied, "refused access", m.SecretKey)
	})
	t.Run("credentials in the URL", func(t *testing.T) {
		u := "http://" + m.AccessKey + ":" + m.SecretKey + "@" + m.Addr
		_, err := s3.New(ctx, s3.Config{Endpoint: u, Bucket: m.Bucket})
		check(t, err, errdefs.IsInvalidArgument, "must not carry credentials", m.SecretKey)
	})
	t.Run("endpoint down", func(t *testing.T) {
		other := peers.StartMinIO(t)
		other.Stop()
		start := time.Now()
		_, err := s3.New(ctx, s3.Config{Endpoint: other.Endpoint, Bucket: other.Bucket})
		check(t, err, errdefs.IsUnavailable, other.Addr, m.SecretKey)
		if el := time.Since(start); el > 20*time.Second {
			t.Errorf("New took %v to give up on a dead endpoint", el)
		}
	})
}

// TestSharedCredentialsFile: with no credentials in the environment, the shared
// credentials file (and its profile) is used.
func TestSharedCredentialsFile(t *testing.T) {
	m := peers.StartMinIO(t)
	useEnvCredentials(t, m)
	t.Setenv("AWS_ACCESS_KEY_ID", "")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "")
	file := filepath.Join(t.TempDir(), "credentials")
	content := fmt.Sprintf("[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing1\n\n[cove]\naws_access_key_id = %s\naws_secret_access_key = %s\n", m.AccessKey, m.SecretKey)
	if err := os.WriteFile(file, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", file)
	t.Setenv("AWS_PROFILE", "cove")
	d, err := s3.New(context.Background(), s3.Config{Endpoint: m.Endpoint, Bucket: m.Bucket})
	if err != nil {
		t.Fatalf("New with a shared credentials file: %v", err)
	}
	if err := d.PutRecord(context.Background(), "a/b", []byte("v")); err != nil {
		t.Fatal(err)
	}
	t.Setenv("AWS_PROFILE", "default")
	if _, err := s3.New(context.Background(), s3.Config{Endpoint: m.Endpoint, Bucket: m.Bucket}); !errdefs.IsPermissionDenied(err) {
		t.Fatalf("New with the default profile's wrong key: %v", err)
	}
}

// TestStoreDownFailsFast: once S3 stopped answering, requests fail at once with
// ErrUnavailable instead of each waiting for retries; when it answers again, the driver
// uses it again.
func TestStoreDownFailsFast(t *testing.T) {
	m := peers.StartMinIO(t)
	useEnvCredentials(t, m)
	d, err := s3.New(context.Background(), s3.Config{Endpoint: m.Endpoint, Bucket: m.Bucket})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	data, dgst := storagetest.RandomBlob(t, 1000)
	m.Stop()
	if _, err := d.Stat(ctx, dgst); err == nil || errdefs.IsNotFound(err) {
		t.Fatalf("Stat with S3 down: %v", err)
	}
	start := time.Now()
	for range 20 {
		if _, err := d.GetRecord(ctx, "some/record"); !errdefs.IsUnavailable(err) {
			t.Fatalf("GetRecord with S3 down: %v, want unavailable", err)
		}
		if err := d.Put(ctx, dgst, int64(len(data)), bytes.NewReader(data)); !errdefs.IsUnavailable(err) {
			t.Fatalf("Put with S3 down: %v, want unavailable", err)
		}
	}
	if el := time.Since(start); el > 500*time.Millisecond {
		t.Errorf("40 requests with S3 down took %v: they should fail at once", el)
	}
	m.Restart(t)
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := d.Put(ctx, dgst, int64(len(data)), bytes.NewReader(data))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Put 10 s after S3 came back: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if n, err := d.Stat(ctx, dgst); err != nil || n != int64(len(data)) {
		t.Fatalf("Stat after S3 came back: %d, %v", n, err)
	}
}

// activeReader counts the Puts reading their source at once: from the first Read to EOF.
type activeReader struct {
	r            io.Reader
	started      bool
	active, peak *atomic.Int64
}

func (a *activeReader) Read(p []byte) (int, error) {
	if !a.started {
		a.started = true
		n := a.active.Add(1)
		for {
			old := a.peak.Load()
			if n <= old || a.peak.CompareAndSwap(old, n) {
				break
			}
		}
		time.Sleep(20 * time.Millisecond) // let the others catch up
	}
	n, err := a.r.Read(p)
	if err == io.EOF {
		a.active.Add(-1)
	}
	return n, err
}

// TestUploadsBounded: with MaxUploads 2, eight large Puts at once read at most two
// sources at a time (two part buffers); small blobs do not wait behind them.
func TestUploadsBounded(t *testing.T) {
	m := peers.StartMinIO(t)
	useEnvCredentials(t, m)
	d, _ := newDriver(t, m, s3.Config{MaxUploads: 2})
	ctx := context.Background()
	var active, peak atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		data, dgst := storagetest.RandomBlob(t, partSize+4096)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.Put(ctx, dgst, int64(len(data)), &activeReader{r: bytes.NewReader(data), active: &active, peak: &peak}); err != nil {
				t.Error(err)
			}
		}()
	}
	time.Sleep(30 * time.Millisecond)
	small, sdgst := storagetest.RandomBlob(t, 2000)
	start := time.Now()
	if err := d.Put(ctx, sdgst, int64(len(small)), bytes.NewReader(small)); err != nil {
		t.Fatal(err)
	}
	smallTook := time.Since(start)
	wg.Wait()
	if p := peak.Load(); p != 2 {
		t.Errorf("%d uploads read their source at once, want 2 (MaxUploads)", p)
	}
	t.Logf("a small Put during eight large ones took %v", smallTook)
	if smallTook > time.Second {
		t.Errorf("a small Put waited %v behind large uploads", smallTook)
	}
}
