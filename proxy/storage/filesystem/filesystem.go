// Package filesystem is the embedded default storage backend: blobs and records as files
// under one directory.
//
// Layout:
//
//	<root>/blobs/<algorithm>/<encoded>  complete, verified blobs
//	<root>/records/<key>                small metadata values
//	<root>/tmp/                         files being written; emptied at start-up
//	<root>/cove.lock                    locked by the process using the store (LockFile)
//
// Everything becomes visible by rename(2) after fsync, so a kill -9 at any moment leaves
// either nothing or the whole, verified object; leftovers in tmp/ are removed by New.
//
// One process uses a directory at a time: New locks it before removing anything (and
// cove-cache keeps its in-flight fills under it too), so a second process on the same
// directory is refused instead of discarding the first one's writes in progress.
package filesystem

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/storage"
)

// Driver is a storage.Driver over a local directory.
type Driver struct {
	root string
	lock *os.File // holds the flock on LockFile until Close
}

var (
	_ storage.Driver      = (*Driver)(nil)
	_ storage.FileAdopter = (*Driver)(nil)
)

// New opens (creating if needed) a store under root, locks it for this Driver (a
// *LockedError when another process or Driver has it), and removes leftovers of writes
// that a crash interrupted. The lock is held until Close or the end of the process.
func New(root string) (_ *Driver, err error) {
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(abs, 0o750); err != nil {
		return nil, fmt.Errorf("create storage directory: %w", err)
	}
	lock, err := lockDir(abs)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			lock.Close()
		}
	}()
	d := &Driver{root: abs, lock: lock}
	if err := os.RemoveAll(d.tmpDir()); err != nil {
		return nil, fmt.Errorf("clean %s: %w", d.tmpDir(), err)
	}
	for _, dir := range []string{d.tmpDir(), filepath.Join(abs, "blobs"), filepath.Join(abs, "records")} {
		if err := os.MkdirAll(dir, 0o750); err != nil {
			return nil, fmt.Errorf("create storage directory: %w", err)
		}
	}
	return d, nil
}

// Close releases the directory lock: another Driver or process may then open the
// directory, discarding any write of d's still in progress. Use d no more.
func (d *Driver) Close() error {
	if d.lock == nil {
		return nil
	}
	err := d.lock.Close()
	d.lock = nil
	return err
}

// Root is the directory the store lives in.
func (d *Driver) Root() string { return d.root }

func (d *Driver) tmpDir() string { return filepath.Join(d.root, "tmp") }

func (d *Driver) blobPath(dgst digest.Digest) (string, error) {
	if err := storage.Verify(dgst); err != nil {
		return "", err
	}
	return filepath.Join(d.root, "blobs", dgst.Algorithm().String(), dgst.Encoded()), nil
}

func (d *Driver) recordPath(key string) (string, error) {
	if err := storage.ValidateKey(key); err != nil {
		return "", err
	}
	return filepath.Join(d.root, "records", filepath.FromSlash(key)), nil
}

func (d *Driver) Stat(_ context.Context, dgst digest.Digest) (int64, error) {
	p, err := d.blobPath(dgst)
	if err != nil {
		return 0, err
	}
	fi, err := os.Stat(p)
	if err != nil {
		return 0, classify(err, dgst.String())
	}
	return fi.Size(), nil
}

func (d *Driver) Open(_ context.Context, dgst digest.Digest) (storage.Blob, error) {
	p, err := d.blobPath(dgst)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(p)
	if err != nil {
		return nil, classify(err, dgst.String())
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &blob{File: f, size: fi.Size()}, nil
}

type blob struct {
	*os.File
	size int64
}

func (b *blob) Size() int64 { return b.size }

func (d *Driver) Put(ctx context.Context, dgst digest.Digest, size int64, r io.Reader) error {
	p, err := d.blobPath(dgst)
	if err != nil {
		return err
	}
	if fi, err := os.Stat(p); err == nil && fi.Size() == size {
		return nil
	}
	return d.writeAtomic(p, func(f *os.File) error {
		_, err := io.Copy(f, storage.VerifyingReader(contextReader{ctx, r}, dgst, size))
		return err
	})
}

// AdoptFile renames a verified file into place. It must be on the same filesystem as
// the store; otherwise it is copied and verified like Put.
func (d *Driver) AdoptFile(ctx context.Context, dgst digest.Digest, size int64, path string) error {
	p, err := d.blobPath(dgst)
	if err != nil {
		os.Remove(path)
		return err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.Size() != size {
		os.Remove(path)
		return fmt.Errorf("%w: %s has %d bytes, want %d", errdefs.ErrFailedPrecondition, dgst, fi.Size(), size)
	}
	if err := syncFile(path); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
		return err
	}
	if err := os.Rename(path, p); err != nil {
		var linkErr *os.LinkError
		if errors.As(err, &linkErr) && errors.Is(linkErr.Err, errXDev) {
			f, err := os.Open(path)
			if err != nil {
				return err
			}
			defer os.Remove(path)
			defer f.Close()
			return d.Put(ctx, dgst, size, f)
		}
		return err
	}
	return syncDir(filepath.Dir(p))
}

func (d *Driver) Delete(_ context.Context, dgst digest.Digest) error {
	p, err := d.blobPath(dgst)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil {
		return classify(err, dgst.String())
	}
	return nil
}

func (d *Driver) PutRecord(_ context.Context, key string, value []byte) error {
	p, err := d.recordPath(key)
	if err != nil {
		return err
	}
	return d.writeAtomic(p, func(f *os.File) error {
		_, err := f.Write(value)
		return err
	})
}

func (d *Driver) GetRecord(_ context.Context, key string) ([]byte, error) {
	p, err := d.recordPath(key)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, classify(err, "record "+key)
	}
	return b, nil
}

func (d *Driver) DeleteRecord(_ context.Context, key string) error {
	p, err := d.recordPath(key)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil {
		return classify(err, "record "+key)
	}
	return nil
}

// Walk lists blobs/<algorithm>/<encoded>. Names that are not a valid digest (none are
// written) are skipped.
func (d *Driver) Walk(ctx context.Context, fn func(storage.BlobInfo) error) error {
	algs, err := os.ReadDir(filepath.Join(d.root, "blobs"))
	if err != nil {
		return err
	}
	for _, alg := range algs {
		if !alg.IsDir() {
			continue
		}
		dir := filepath.Join(d.root, "blobs", alg.Name())
		entries, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		for _, e := range entries {
			if err := ctx.Err(); err != nil {
				return err
			}
			dgst := digest.NewDigestFromEncoded(digest.Algorithm(alg.Name()), e.Name())
			if !e.Type().IsRegular() || storage.Verify(dgst) != nil {
				continue
			}
			fi, err := e.Info()
			if errors.Is(err, fs.ErrNotExist) {
				continue // deleted since the listing
			}
			if err != nil {
				return err
			}
			if err := fn(storage.BlobInfo{Digest: dgst, Size: fi.Size()}); err != nil {
				return err
			}
		}
	}
	return nil
}

// ListRecords walks records/<prefix...>.
func (d *Driver) ListRecords(ctx context.Context, prefix string, fn func(key string) error) error {
	if err := storage.ValidatePrefix(prefix); err != nil {
		return err
	}
	base := filepath.Join(d.root, "records")
	// Start at the deepest directory the prefix names whole, and filter the rest.
	start := base
	if i := strings.LastIndexByte(prefix, '/'); i >= 0 {
		start = filepath.Join(base, filepath.FromSlash(prefix[:i]))
	}
	err := filepath.WalkDir(start, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if e.IsDir() {
			return nil
		}
		rel, err := filepath.Rel(base, path)
		if err != nil {
			return err
		}
		key := filepath.ToSlash(rel)
		if !strings.HasPrefix(key, prefix) {
			return nil
		}
		return fn(key)
	})
	return err
}

// writeAtomic writes a temporary file with fill, syncs it, and renames it to final.
func (d *Driver) writeAtomic(final string, fill func(*os.File) error) (err error) {
	f, err := os.CreateTemp(d.tmpDir(), "put-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = fill(f); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.MkdirAll(filepath.Dir(final), 0o750); err != nil {
		return err
	}
	if err = os.Rename(tmp, final); err != nil {
		return err
	}
	return syncDir(filepath.Dir(final))
}

func classify(err error, what string) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s: %w", what, errdefs.ErrNotFound)
	}
	return err
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// contextReader stops a copy when its context ends.
type contextReader struct {
	ctx context.Context
	r   io.Reader
}

func (c contextReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// OSFile exposes the open file so the HTTP server can hand it to sendfile(2).
func (b *blob) OSFile() *os.File { return b.File }
