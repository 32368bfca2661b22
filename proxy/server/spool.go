package server

import (
	"bufio"
	"io"
	"os"
	"path/filepath"

	"github.com/opencontainers/go-digest"
)

// spool is the copy of an upload kept on the way to the origin: the bytes forwarded, in
// order, in a file, and their digest. It never fails a push: when it cannot follow (a
// write error, a full disk, a chunk that does not continue where the last ended, an
// origin that did not take what was sent), it is dropped and the upload goes on as a
// pass-through; nothing of it is stored.
type spool struct {
	path     string
	file     *os.File
	buf      *bufio.Writer // batches the file's writes while a request streams (nil between requests)
	digester digest.Digester
	size     int64
	broken   bool
}

// spoolBuffer is the size of the spool's write buffer: one per upload being written.
const spoolBuffer = 256 << 10

func newSpool(path string) *spool {
	return &spool{path: path, digester: digest.Canonical.Digester()}
}

// usable reports whether the spool still mirrors what the origin was sent.
func (s *spool) usable() bool { return !s.broken }

// tee returns a reader of body that appends what is read to the spool, starting at
// offset (the client's Content-Range start, or the spool's end when it names none). A
// chunk that does not start at the spool's end drops the spool.
func (s *spool) tee(body io.Reader, offset int64) io.Reader {
	if offset != s.size {
		s.drop()
	}
	if s.broken {
		return body
	}
	return &teeReader{r: body, s: s}
}

type teeReader struct {
	r io.Reader
	s *spool
}

func (t *teeReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if n > 0 {
		t.s.write(p[:n])
	}
	return n, err
}

func (s *spool) write(p []byte) {
	if s.broken {
		return
	}
	if s.file == nil {
		f, err := createSpoolFile(s.path)
		if err != nil {
			s.drop()
			return
		}
		s.file = f
	}
	if s.buf == nil {
		s.buf = bufio.NewWriterSize(s.file, spoolBuffer)
	}
	if _, err := s.buf.Write(p); err != nil {
		s.drop()
		return
	}
	s.digester.Hash().Write(p)
	s.size += int64(len(p))
}

// agree checks the spool against the size the origin says it holds (its Range after a
// chunk); a disagreement drops the spool.
func (s *spool) agree(originSize int64) {
	if originSize != s.size {
		s.drop()
	}
}

// finish checks the spool against the digest the origin accepted and returns the file
// holding exactly that blob, closed, or ok=false. The caller owns the file afterwards.
func (s *spool) finish(want digest.Digest) (path string, size int64, ok bool) {
	if s.broken || want.Algorithm() != digest.Canonical || s.digester.Digest() != want {
		s.drop()
		return "", 0, false
	}
	if s.file == nil { // the empty blob
		f, err := createSpoolFile(s.path)
		if err != nil {
			s.drop()
			return "", 0, false
		}
		s.file = f
	}
	// No fsync here: storage makes the file durable when it adopts it (FileAdopter) or
	// copies it (Put).
	err := s.pause()
	if cerr := s.file.Close(); err == nil {
		err = cerr
	}
	s.file = nil
	if err != nil {
		s.drop()
		return "", 0, false
	}
	s.broken = true // handed over: nothing more is written, discard removes nothing the caller kept
	return s.path, s.size, true
}

// pause writes out what is buffered and lets the buffer go: called at the end of every
// request, so memory is held only while a request streams.
func (s *spool) pause() error {
	if s.buf == nil {
		return nil
	}
	err := s.buf.Flush()
	s.buf = nil
	if err != nil {
		s.drop()
	}
	return err
}

// drop stops spooling and removes the file.
func (s *spool) drop() {
	s.broken = true
	s.discard()
}

// discard removes the spool file if one is left.
func (s *spool) discard() {
	s.buf = nil
	if s.file != nil {
		s.file.Close()
		s.file = nil
		os.Remove(s.path)
	}
}

// createSpoolFile creates an upload's spool file, and its directory on first use: the
// directory lives inside the fill spool, which is emptied at every start (an upload does
// not outlive its process), and exists only while pushes have used it.
func createSpoolFile(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	return os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o640)
}
