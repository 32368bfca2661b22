package s3

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/minio/minio-go/v7"
)

// blob reads a stored object with ranged GETs. It keeps one response body open and
// goes on reading it while reads continue where the last one ended (a whole blob or a
// range is one GET), and starts a new GET at the asked offset otherwise. Memory is the
// caller's buffers only.
type blob struct {
	ctx  context.Context // the Open caller's: a client that leaves ends its GETs
	d    *Driver
	key  string
	name string // digest, for errors
	size int64

	mu      sync.Mutex
	body    io.ReadCloser // open GET, or nil
	bodyOff int64         // offset of body's next byte
	pos     int64         // Read and Seek offset
	closed  bool
}

func (b *blob) Size() int64 { return b.size }

func (b *blob) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("S3: %s: negative offset", b.name)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.readAt(p, off)
}

func (b *blob) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n, err := b.readAt(p, b.pos)
	b.pos += int64(n)
	if err == io.EOF && n > 0 {
		err = nil // io.Reader: the next Read says EOF
	}
	return n, err
}

// readAt fills p from off, as io.ReaderAt does: fewer bytes only at the end (io.EOF)
// or on an error. Called with mu held.
func (b *blob) readAt(p []byte, off int64) (int, error) {
	if b.closed {
		return 0, os.ErrClosed
	}
	if off >= b.size {
		return 0, io.EOF
	}
	want := p
	if rem := b.size - off; int64(len(want)) > rem {
		want = want[:rem]
	}
	if len(want) == 0 {
		return 0, nil
	}
	if b.body != nil && b.bodyOff != off {
		b.body.Close()
		b.body = nil
	}
	if b.body == nil {
		if err := b.d.up.check(); err != nil {
			return 0, err
		}
		var opts minio.GetObjectOptions
		if err := opts.SetRange(off, b.size-1); err != nil {
			return 0, err
		}
		body, _, _, err := b.d.core.GetObject(b.ctx, b.d.bucket, b.key, opts)
		b.d.up.note(b.ctx, err)
		if err != nil {
			return 0, classify(err, b.name)
		}
		b.body, b.bodyOff = body, off
	}
	n, err := io.ReadFull(b.body, want)
	b.bodyOff += int64(n)
	if err != nil {
		b.body.Close()
		b.body = nil
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			err = fmt.Errorf("S3: %s ended at byte %d of %d: %w", b.name, off+int64(n), b.size, io.ErrUnexpectedEOF)
		}
		return n, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (b *blob) Seek(offset int64, whence int) (int64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += b.pos
	case io.SeekEnd:
		offset += b.size
	default:
		return 0, fmt.Errorf("S3: %s: bad whence %d", b.name, whence)
	}
	if offset < 0 {
		return 0, fmt.Errorf("S3: %s: seek before the start", b.name)
	}
	b.pos = offset
	return offset, nil
}

func (b *blob) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	if b.body != nil {
		err := b.body.Close()
		b.body = nil
		return err
	}
	return nil
}
