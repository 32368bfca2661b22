// Package storage defines the one interface every cove-cache storage backend implements.
//
// A backend sees only complete, verified blobs: in-flight fills live in the fill package,
// apart from storage, so a backend that makes an object visible only when it is whole
// (a filesystem rename, an S3 multipart completion) needs nothing special. Every backend
// must pass the shared suite in storagetest.
package storage

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
)

// Driver stores blobs by digest and small records by key.
//
// Errors are classified with errdefs: ErrNotFound for an absent blob or record,
// ErrFailedPrecondition when content does not match its digest or size, ErrInvalidArgument
// for a malformed key or digest.
type Driver interface {
	// Stat returns the size of a stored blob.
	Stat(ctx context.Context, dgst digest.Digest) (int64, error)
	// Open returns a reader over a stored blob.
	Open(ctx context.Context, dgst digest.Digest) (Blob, error)
	// Put stores the blob read from r. The driver verifies size and digest before the blob
	// becomes visible; on mismatch nothing is stored. Storing a blob that exists is a no-op.
	Put(ctx context.Context, dgst digest.Digest, size int64, r io.Reader) error
	// Delete removes a blob; deleting an absent blob returns ErrNotFound.
	Delete(ctx context.Context, dgst digest.Digest) error

	// PutRecord stores a small value (metadata: provenance, tags) atomically.
	PutRecord(ctx context.Context, key string, value []byte) error
	// GetRecord returns a value stored by PutRecord.
	GetRecord(ctx context.Context, key string) ([]byte, error)
	// DeleteRecord removes a record; deleting an absent record returns ErrNotFound.
	DeleteRecord(ctx context.Context, key string) error

	// Walk calls fn for every stored blob, in no set order, until fn returns an error
	// (which Walk returns). Blobs stored or deleted during a walk may or may not be seen.
	// Eviction and usage accounting list the store with it.
	Walk(ctx context.Context, fn func(BlobInfo) error) error
	// ListRecords calls fn with the key of every record whose key starts with prefix
	// (a whole key segment or more: "membership/" or "membership/reg/"), in no set
	// order, until fn returns an error (which ListRecords returns).
	ListRecords(ctx context.Context, prefix string, fn func(key string) error) error
}

// BlobInfo describes a stored blob.
type BlobInfo struct {
	Digest digest.Digest
	Size   int64
}

// Blob is an open stored blob. ReadAt and Seek make ranges cheap; readers over remote
// backends implement them with ranged reads.
type Blob interface {
	io.ReadSeeker
	io.ReaderAt
	io.Closer
	Size() int64
}

// FileAdopter is implemented by drivers that can take a local file the caller has already
// verified (a finished fill) without copying it, for example by renaming it into place.
// The driver still checks the size; the file is moved or removed either way.
type FileAdopter interface {
	AdoptFile(ctx context.Context, dgst digest.Digest, size int64, path string) error
}

// HeldAdopter is implemented by stores that evict (evict.Store): AdoptFileHeld adopts like
// FileAdopter and keeps the blob from being evicted, as an open reader would, until
// release is called. A fill holds the blob it stored while its clients read on.
type HeldAdopter interface {
	AdoptFileHeld(ctx context.Context, dgst digest.Digest, size int64, path string) (release func(), err error)
}

// Verify checks a digest before a driver uses it to build a path or object name.
func Verify(dgst digest.Digest) error {
	if err := dgst.Validate(); err != nil {
		return fmt.Errorf("%w: %v", errdefs.ErrInvalidArgument, err)
	}
	return nil
}

// ValidatePrefix checks a ListRecords prefix: empty (every record), or a key or the
// start of one, optionally ending in "/".
func ValidatePrefix(prefix string) error {
	if prefix == "" {
		return nil
	}
	return ValidateKey(strings.TrimSuffix(prefix, "/"))
}

// ValidateKey checks a record key: slash-separated segments of [A-Za-z0-9._:@+-], no
// empty, "." or ".." segment, at most 1024 bytes. Keys become file paths and object names.
func ValidateKey(key string) error {
	if key == "" || len(key) > 1024 {
		return fmt.Errorf("%w: record key length", errdefs.ErrInvalidArgument)
	}
	for _, seg := range strings.Split(key, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return fmt.Errorf("%w: record key %q has an empty or dot segment", errdefs.ErrInvalidArgument, key)
		}
		for _, c := range seg {
			ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
				strings.ContainsRune("._:@+-", c)
			if !ok {
				return fmt.Errorf("%w: record key %q has character %q", errdefs.ErrInvalidArgument, key, c)
			}
		}
	}
	return nil
}

// VerifyingReader wraps r so that reading it to the end checks its size and digest; the
// final Read returns an ErrFailedPrecondition error instead of io.EOF on mismatch.
func VerifyingReader(r io.Reader, dgst digest.Digest, size int64) io.Reader {
	return &verifyingReader{r: r, want: dgst, size: size, v: dgst.Verifier()}
}

type verifyingReader struct {
	r    io.Reader
	want digest.Digest
	size int64
	n    int64
	v    digest.Verifier
}

func (vr *verifyingReader) Read(p []byte) (int, error) {
	n, err := vr.r.Read(p)
	vr.n += int64(n)
	_, _ = vr.v.Write(p[:n])
	if vr.size >= 0 && vr.n > vr.size {
		return n, fmt.Errorf("%w: blob %s is longer than %d bytes", errdefs.ErrFailedPrecondition, vr.want, vr.size)
	}
	if err == io.EOF {
		if vr.size >= 0 && vr.n != vr.size {
			return n, fmt.Errorf("%w: blob %s: got %d bytes, want %d", errdefs.ErrFailedPrecondition, vr.want, vr.n, vr.size)
		}
		if !vr.v.Verified() {
			return n, fmt.Errorf("%w: blob content does not match digest %s", errdefs.ErrFailedPrecondition, vr.want)
		}
	}
	return n, err
}
