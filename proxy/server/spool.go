package server

import (
	"bufio"
	"io"
	"os"
	"path/filepath"
	"sync"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/storage"
)

// spool is the copy of an upload kept on the way to the origin: the bytes forwarded, in
// order, in a file. It never fails a push: when it cannot follow (a write error, a full
// disk, a chunk that does not continue where the last ended, an origin that did not take
// what was sent), it is dropped and the upload goes on as a pass-through; nothing of it
// is stored.
//
// The bytes are written as the transport reads them for the origin, in the same
// goroutine. (A writer goroutine per upload, tried, cost 15-20% more CPU for the spool
// on a loaded two-core machine, for no gain there.) They are not digested on the way:
// the push waits for nothing but the origin, and the digest is checked after the
// origin's 201, in the background, before the file is stored (verifySpooled). Hashing
// on the way put a SHA-256 pass on the push's critical path (31% of cove-cache's CPU
// in a push, measured with perf); reading the file back from the page cache costs a
// little more CPU in all, off that path. Memory per streaming upload is one write
// buffer, whatever the blob's size.
type spool struct {
	path string
	file *os.File
	// size is the number of bytes the spool took: all in the file once paused.
	size   int64
	broken bool
	// stray: the last request's chunk did not start at the spool's end, so it was not
	// kept: the spool is dropped if the origin took it, kept if it refused it (rewind).
	stray bool

	mu     sync.Mutex   // the tee against pause: a transport may read a body after its answer
	stream *spoolStream // the request streaming now (nil between requests)
	last   *spoolStream // the last request's, which rewind voids
}

// spoolBuffer is the size of the write buffer of a streaming request: 1 MiB, as the
// fills write (fewer system calls; BenchmarkPush 1.15 -> 1.11 against 256 KiB).
const spoolBuffer = 1 << 20

func newSpool(path string) *spool {
	return &spool{path: path}
}

// spoolStream is one request's part of the spool: its write buffer.
type spoolStream struct {
	buf  *bufio.Writer
	void bool // its request was refused by the origin: what it reads is not kept
	// late: the transport read its body after the origin answered (an early refusal
	// does that) and before the handler could rewind: those bytes are not kept, and the
	// spool stands only if the request turns out refused (void).
	late bool
}

// end is the number of bytes the spool took: where the next chunk must start.
func (s *spool) end() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.size
}

// tee returns a reader of body that appends what is read to the spool, starting at
// offset (the client's Content-Range start, or the spool's end when it names none). A
// chunk that does not start at the spool's end is not kept: the spool is dropped unless
// the origin refuses the chunk (rewind). Call pause when the request ends.
func (s *spool) tee(body io.Reader, offset int64) io.Reader {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stray || s.lateLocked() {
		s.dropLocked()
	}
	if s.broken {
		return body
	}
	if offset != s.size {
		s.stray = true
		return body
	}
	if s.file == nil {
		f, err := createSpoolFile(s.path)
		if err != nil {
			s.dropLocked()
			return body
		}
		s.file = f
	}
	st := &spoolStream{buf: bufio.NewWriterSize(s.file, spoolBuffer)}
	s.stream, s.last = st, st
	return &teeReader{r: body, s: s, st: st}
}

type teeReader struct {
	r  io.Reader
	s  *spool
	st *spoolStream
}

func (t *teeReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if n > 0 {
		t.s.write(t.st, p[:n])
	}
	return n, err
}

// write appends p for the request st. Bytes read after st's request ended (a transport
// still reading a body after the origin answered) were forwarded, not kept: they void
// nothing if the origin refused the request (rewind), and break the spool otherwise.
func (s *spool) write(st *spoolStream, p []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken || st.void {
		return
	}
	if s.stream != st {
		if st == s.last {
			st.late = true // the verdict on the request is still to come
			return
		}
		s.dropLocked()
		return
	}
	if _, err := st.buf.Write(p); err != nil {
		s.dropLocked()
		return
	}
	s.size += int64(len(p))
}

// pause ends the streaming request: what is buffered is written and the buffer let go.
// Called at the end of every request that teed.
func (s *spool) pause() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pauseLocked()
}

func (s *spool) pauseLocked() error {
	st := s.stream
	if st == nil {
		return nil
	}
	s.stream = nil
	err := st.buf.Flush()
	if err != nil {
		s.dropLocked()
	}
	return err
}

// rewind forgets what the last request added, which the origin refused (a 4xx: it took
// none of it), so a chunk sent with a handle by someone the origin turns away (another
// tenant, no credential) does not cost the upload's owner its copy. The spool goes back
// to its size before that request (mark, from end); bytes a transport still reads from
// that request's body are ignored. Called after pause.
func (s *spool) rewind(mark int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stray = false
	if s.last != nil {
		s.last.void = true
	}
	if s.broken || s.size == mark {
		return
	}
	if s.size < mark || s.stream != nil || s.file == nil {
		s.dropLocked()
		return
	}
	if err := s.file.Truncate(mark); err != nil {
		s.dropLocked()
		return
	}
	if _, err := s.file.Seek(mark, io.SeekStart); err != nil {
		s.dropLocked()
		return
	}
	s.size = mark
}

// agree checks the spool against the size the origin says it holds (its Range after a
// chunk); a disagreement drops the spool.
func (s *spool) agree(originSize int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if originSize != s.size || s.stray || s.lateLocked() {
		s.dropLocked()
	}
}

// finish ends the spool of a blob the origin accepted as want, and returns the file
// holding the bytes forwarded, closed, or ok=false when the spool could not follow. The
// bytes are not checked against want yet: verifySpooled does that before they are
// stored. The caller owns the file afterwards.
func (s *spool) finish(want digest.Digest) (path string, size int64, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.pauseLocked(); err != nil || s.broken || s.stray || s.lateLocked() || want.Algorithm() != digest.Canonical {
		s.dropLocked()
		return "", 0, false
	}
	if s.file == nil { // the empty blob
		f, err := createSpoolFile(s.path)
		if err != nil {
			s.dropLocked()
			return "", 0, false
		}
		s.file = f
	}
	// No fsync here: storage makes the file durable when it adopts it (FileAdopter) or
	// copies it (Put).
	err := s.file.Close()
	s.file = nil
	if err != nil {
		s.dropLocked()
		return "", 0, false
	}
	s.broken = true // handed over: nothing more is written, discard removes nothing the caller kept
	return s.path, s.size, true
}

// lateLocked: the last request's body was read after it ended, and the origin did not
// refuse it: bytes it took are missing from the spool.
func (s *spool) lateLocked() bool {
	return s.last != nil && s.last.late && !s.last.void
}

// drop stops spooling and removes the file.
func (s *spool) drop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropLocked()
}

func (s *spool) dropLocked() {
	s.broken = true
	s.discardLocked()
}

// discard removes the spool file if one is left.
func (s *spool) discard() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.discardLocked()
}

func (s *spool) discardLocked() {
	s.stream = nil
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

// verifySpooled checks that the file at path holds exactly size bytes of digest want.
func verifySpooled(path string, size int64, want digest.Digest) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	// Large reads: the file is in the page cache, and each read is a system call.
	// (io.Copy to io.Discard would read 8 KiB at a time.)
	r, buf := storage.VerifyingReader(f, want, size), make([]byte, 1<<20)
	for {
		if _, err := r.Read(buf); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
	}
}
