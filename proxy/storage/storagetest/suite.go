// Package storagetest is the suite every storage.Driver must pass, so backends cannot
// drift apart in what they promise.
package storagetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/storage"
)

// Run runs the suite against drivers made by newDriver, a fresh empty store each call.
func Run(t *testing.T, newDriver func(t *testing.T) storage.Driver) {
	t.Run("PutOpenStat", func(t *testing.T) { testPutOpenStat(t, newDriver(t)) })
	t.Run("Ranges", func(t *testing.T) { testRanges(t, newDriver(t)) })
	t.Run("RejectsWrongDigest", func(t *testing.T) { testRejectsWrongDigest(t, newDriver(t)) })
	t.Run("RejectsWrongSize", func(t *testing.T) { testRejectsWrongSize(t, newDriver(t)) })
	t.Run("FailedReaderStoresNothing", func(t *testing.T) { testFailedReader(t, newDriver(t)) })
	t.Run("PutTwice", func(t *testing.T) { testPutTwice(t, newDriver(t)) })
	t.Run("Delete", func(t *testing.T) { testDelete(t, newDriver(t)) })
	t.Run("NotFound", func(t *testing.T) { testNotFound(t, newDriver(t)) })
	t.Run("InvalidDigest", func(t *testing.T) { testInvalidDigest(t, newDriver(t)) })
	t.Run("Records", func(t *testing.T) { testRecords(t, newDriver(t)) })
	t.Run("InvalidRecordKeys", func(t *testing.T) { testInvalidRecordKeys(t, newDriver(t)) })
	t.Run("Empty", func(t *testing.T) { testEmptyBlob(t, newDriver(t)) })
	t.Run("Walk", func(t *testing.T) { testWalk(t, newDriver(t)) })
	t.Run("ListRecords", func(t *testing.T) { testListRecords(t, newDriver(t)) })
}

// RandomBlob returns n random bytes and their digest.
func RandomBlob(t testing.TB, n int) ([]byte, digest.Digest) {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b, digest.FromBytes(b)
}

func put(t *testing.T, d storage.Driver, b []byte, dgst digest.Digest) {
	t.Helper()
	if err := d.Put(context.Background(), dgst, int64(len(b)), bytes.NewReader(b)); err != nil {
		t.Fatalf("Put: %v", err)
	}
}

func readAll(t *testing.T, d storage.Driver, dgst digest.Digest) []byte {
	t.Helper()
	b, err := d.Open(context.Background(), dgst)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer b.Close()
	data, err := io.ReadAll(b)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return data
}

func testPutOpenStat(t *testing.T, d storage.Driver) {
	data, dgst := RandomBlob(t, 3<<20+17)
	put(t, d, data, dgst)
	size, err := d.Stat(context.Background(), dgst)
	if err != nil || size != int64(len(data)) {
		t.Fatalf("Stat = %d, %v; want %d", size, err, len(data))
	}
	if got := readAll(t, d, dgst); !bytes.Equal(got, data) {
		t.Fatal("content differs")
	}
}

func testRanges(t *testing.T, d storage.Driver) {
	data, dgst := RandomBlob(t, 1<<20)
	put(t, d, data, dgst)
	b, err := d.Open(context.Background(), dgst)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Size() != int64(len(data)) {
		t.Fatalf("Size = %d", b.Size())
	}
	buf := make([]byte, 1000)
	if _, err := b.ReadAt(buf, 12345); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, data[12345:13345]) {
		t.Fatal("ReadAt content differs")
	}
	if _, err := b.Seek(int64(len(data))-10, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	tail, err := io.ReadAll(b)
	if err != nil || !bytes.Equal(tail, data[len(data)-10:]) {
		t.Fatalf("tail after Seek: %v", err)
	}
}

func testRejectsWrongDigest(t *testing.T, d storage.Driver) {
	data, _ := RandomBlob(t, 4096)
	_, other := RandomBlob(t, 4096)
	err := d.Put(context.Background(), other, int64(len(data)), bytes.NewReader(data))
	if !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("Put with wrong digest: %v, want failed precondition", err)
	}
	if _, err := d.Stat(context.Background(), other); !errdefs.IsNotFound(err) {
		t.Fatalf("blob visible after a rejected Put: %v", err)
	}
}

func testRejectsWrongSize(t *testing.T, d storage.Driver) {
	data, dgst := RandomBlob(t, 4096)
	for _, size := range []int64{4095, 4097} {
		err := d.Put(context.Background(), dgst, size, bytes.NewReader(data))
		if !errdefs.IsFailedPrecondition(err) {
			t.Fatalf("Put with size %d: %v, want failed precondition", size, err)
		}
	}
	// Truncated: the reader ends early.
	err := d.Put(context.Background(), dgst, int64(len(data)), bytes.NewReader(data[:100]))
	if !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("Put of truncated content: %v", err)
	}
	if _, err := d.Stat(context.Background(), dgst); !errdefs.IsNotFound(err) {
		t.Fatalf("blob visible after rejected Puts: %v", err)
	}
}

type failingReader struct{ n int }

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n <= 0 {
		return 0, io.ErrUnexpectedEOF
	}
	n := min(len(p), f.n)
	f.n -= n
	return n, nil
}

func testFailedReader(t *testing.T, d storage.Driver) {
	_, dgst := RandomBlob(t, 10000)
	err := d.Put(context.Background(), dgst, 10000, &failingReader{n: 5000})
	if err == nil {
		t.Fatal("Put from a failing reader succeeded")
	}
	if _, err := d.Stat(context.Background(), dgst); !errdefs.IsNotFound(err) {
		t.Fatalf("blob visible after failed Put: %v", err)
	}
}

func testPutTwice(t *testing.T, d storage.Driver) {
	data, dgst := RandomBlob(t, 2048)
	put(t, d, data, dgst)
	put(t, d, data, dgst)
	if got := readAll(t, d, dgst); !bytes.Equal(got, data) {
		t.Fatal("content differs after second Put")
	}
}

func testDelete(t *testing.T, d storage.Driver) {
	data, dgst := RandomBlob(t, 2048)
	put(t, d, data, dgst)
	if err := d.Delete(context.Background(), dgst); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Stat(context.Background(), dgst); !errdefs.IsNotFound(err) {
		t.Fatalf("Stat after Delete: %v", err)
	}
	if err := d.Delete(context.Background(), dgst); !errdefs.IsNotFound(err) {
		t.Fatalf("second Delete: %v, want not found", err)
	}
}

func testNotFound(t *testing.T, d storage.Driver) {
	_, dgst := RandomBlob(t, 10)
	if _, err := d.Stat(context.Background(), dgst); !errdefs.IsNotFound(err) {
		t.Fatalf("Stat: %v", err)
	}
	if _, err := d.Open(context.Background(), dgst); !errdefs.IsNotFound(err) {
		t.Fatalf("Open: %v", err)
	}
	if _, err := d.GetRecord(context.Background(), "no/such/record"); !errdefs.IsNotFound(err) {
		t.Fatalf("GetRecord: %v", err)
	}
}

func testInvalidDigest(t *testing.T, d storage.Driver) {
	for _, bad := range []digest.Digest{"", "sha256:../../etc/passwd", "sha256:abc", "md5:d41d8cd98f00b204e9800998ecf8427e", "sha256:" + digest.Digest(bytes.Repeat([]byte("G"), 64))} {
		if _, err := d.Stat(context.Background(), bad); !errdefs.IsInvalidArgument(err) {
			t.Errorf("Stat(%q): %v, want invalid argument", bad, err)
		}
		if err := d.Put(context.Background(), bad, 0, bytes.NewReader(nil)); !errdefs.IsInvalidArgument(err) {
			t.Errorf("Put(%q): %v, want invalid argument", bad, err)
		}
	}
}

func testRecords(t *testing.T, d storage.Driver) {
	ctx := context.Background()
	key := "provenance/127.0.0.1:5000/sha256/abc"
	if err := d.PutRecord(ctx, key, []byte("v1")); err != nil {
		t.Fatal(err)
	}
	if err := d.PutRecord(ctx, key, []byte("v2")); err != nil {
		t.Fatal(err)
	}
	got, err := d.GetRecord(ctx, key)
	if err != nil || string(got) != "v2" {
		t.Fatalf("GetRecord = %q, %v", got, err)
	}
	if err := d.DeleteRecord(ctx, key); err != nil {
		t.Fatal(err)
	}
	if _, err := d.GetRecord(ctx, key); !errdefs.IsNotFound(err) {
		t.Fatalf("after delete: %v", err)
	}
}

func testInvalidRecordKeys(t *testing.T, d storage.Driver) {
	for _, bad := range []string{"", "../escape", "a/../../b", "a//b", "/abs", "a/./b", "sp ace", "new\nline", "a\\b"} {
		if err := d.PutRecord(context.Background(), bad, []byte("x")); !errdefs.IsInvalidArgument(err) {
			t.Errorf("PutRecord(%q): %v, want invalid argument", bad, err)
		}
	}
}

func testEmptyBlob(t *testing.T, d storage.Driver) {
	dgst := digest.FromBytes(nil)
	put(t, d, nil, dgst)
	if got := readAll(t, d, dgst); len(got) != 0 {
		t.Fatal("empty blob has content")
	}
}
