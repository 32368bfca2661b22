package s3

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/minio/minio-go/v7"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/storage"
)

// Put stores the blob read from r. It holds at most one part (PartSize bytes) in memory,
// and at most MaxUploads blobs larger than 1 MiB are uploaded at once (others wait).
// The last part is read, and the whole blob checked against dgst and size, before that
// part is sent: a blob that does not match is never completed (its multipart upload is
// aborted, or its single PUT never sent), so nothing of it becomes visible.
func (d *Driver) Put(ctx context.Context, dgst digest.Digest, size int64, r io.Reader) error {
	key, err := blobKey(dgst)
	if err != nil {
		return err
	}
	if size < 0 {
		return fmt.Errorf("%w: blob %s: negative size %d", errdefs.ErrInvalidArgument, dgst, size)
	}
	if n, err := d.Stat(ctx, dgst); err == nil && n == size {
		return nil // content-addressed: the same digest is the same bytes
	}
	if err := d.up.check(); err != nil {
		return err
	}
	vr := storage.VerifyingReader(&ctxReader{ctx: ctx, r: r}, dgst, size)
	if size <= smallBlob {
		return d.putSingle(ctx, key, dgst, vr, make([]byte, size))
	}
	select {
	case d.uploads <- struct{}{}:
		defer func() { <-d.uploads }()
	case <-ctx.Done():
		return ctx.Err()
	}
	partSize := d.partSizeFor(size)
	bp := d.getBuf(partSize)
	defer d.putBuf(bp)
	buf := *bp
	if size <= partSize {
		return d.putSingle(ctx, key, dgst, vr, buf[:size])
	}
	return d.putMultipart(ctx, key, dgst, vr, size, buf[:partSize])
}

// putSingle reads and verifies the whole (small) blob, then sends it with one PUT.
func (d *Driver) putSingle(ctx context.Context, key string, dgst digest.Digest, vr io.Reader, buf []byte) error {
	if _, err := io.ReadFull(vr, buf); err != nil {
		return readErr(err, dgst, int64(len(buf)))
	}
	if err := verifyEnd(vr); err != nil {
		return err
	}
	_, err := d.client.PutObject(ctx, d.bucket, key, bytes.NewReader(buf), int64(len(buf)),
		minio.PutObjectOptions{ContentType: "application/octet-stream", DisableMultipart: true})
	d.up.note(ctx, err)
	return classify(err, "storing "+dgst.String())
}

// putMultipart sends the blob in parts of len(buf); the last part goes only once the
// blob has matched, and the upload is completed only then. Any failure aborts it.
func (d *Driver) putMultipart(ctx context.Context, key string, dgst digest.Digest, vr io.Reader, size int64, buf []byte) (err error) {
	uploadID, err := d.core.NewMultipartUpload(ctx, d.bucket, key, minio.PutObjectOptions{ContentType: "application/octet-stream"})
	d.up.note(ctx, err)
	if err != nil {
		return classify(err, "starting upload of "+dgst.String())
	}
	defer func() {
		if err == nil {
			return
		}
		// The caller's context may be what failed: abort on a context of our own.
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if aerr := d.core.AbortMultipartUpload(actx, d.bucket, key, uploadID); aerr != nil {
			d.log.Warn("S3: aborting a failed upload failed; the bucket keeps its parts until a lifecycle rule or the next start-up removes them",
				"bucket", d.bucket, "key", key, "error", aerr)
		}
	}()
	partLen := int64(len(buf))
	var parts []minio.CompletePart
	for num, off := 1, int64(0); off < size; num++ {
		n := min(partLen, size-off)
		if _, err := io.ReadFull(vr, buf[:n]); err != nil {
			return readErr(err, dgst, size)
		}
		off += n
		if off == size {
			// The last part: the blob must match before any of it is completed.
			if err := verifyEnd(vr); err != nil {
				return err
			}
		}
		part, err := d.core.PutObjectPart(ctx, d.bucket, key, uploadID, num, bytes.NewReader(buf[:n]), n, minio.PutObjectPartOptions{})
		d.up.note(ctx, err)
		if err != nil {
			return classify(err, fmt.Sprintf("uploading part %d of %s", num, dgst))
		}
		parts = append(parts, minio.CompletePart{PartNumber: num, ETag: part.ETag})
	}
	if _, err := d.core.CompleteMultipartUpload(ctx, d.bucket, key, uploadID, parts,
		minio.PutObjectOptions{ContentType: "application/octet-stream"}); err != nil {
		return classify(err, "completing upload of "+dgst.String())
	}
	return nil
}

// verifyEnd reads vr, a storage.VerifyingReader that has delivered the blob's size, to
// its end: io.EOF means size and digest matched; more bytes or a wrong digest come back
// as its ErrFailedPrecondition error.
func verifyEnd(vr io.Reader) error {
	var one [1]byte
	for range 100 {
		_, err := vr.Read(one[:])
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
	return fmt.Errorf("%w: blob reader returns no end", errdefs.ErrFailedPrecondition)
}

// readErr classifies a failure to read the blob's bytes: an early end is a size
// mismatch; the verifying reader's and the source's own errors pass through.
func readErr(err error, dgst digest.Digest, size int64) error {
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: blob %s is shorter than %d bytes", errdefs.ErrFailedPrecondition, dgst, size)
	}
	return err
}

// partSizeFor is the configured part size, grown for blobs that would need more than
// S3's 10000 parts (in whole MiB).
func (d *Driver) partSizeFor(size int64) int64 {
	p := d.partSize
	if need := (size + maxParts - 1) / maxParts; need > p {
		p = (need + 1<<20 - 1) &^ (1<<20 - 1)
	}
	return p
}

// Part buffers of the configured size are reused across uploads.
var bufPools sync.Map // part size -> *sync.Pool

func (d *Driver) getBuf(n int64) *[]byte {
	if n != d.partSize {
		b := make([]byte, n)
		return &b
	}
	p, _ := bufPools.LoadOrStore(n, &sync.Pool{New: func() any { b := make([]byte, n); return &b }})
	return p.(*sync.Pool).Get().(*[]byte)
}

func (d *Driver) putBuf(b *[]byte) {
	if int64(len(*b)) != d.partSize {
		return
	}
	if p, ok := bufPools.Load(d.partSize); ok {
		p.(*sync.Pool).Put(b)
	}
}

// ctxReader stops reading once ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
