// Package fill runs one origin fetch per missing blob and streams it to every client that
// asks for the blob while it arrives.
//
// A fill spools the origin's body to a local file and publishes how much of it is there;
// readers (one per client request, each with its own byte range) read the spool with
// ReadAt as it grows. The last byte is withheld until the whole body has been checked
// against its digest and size, so no client ever receives a complete body that is wrong:
// a truncated or corrupt fill ends every reader with an error instead.
//
// Fills run on their own context: a client that disconnects does not cancel the fetch
// for the others. Storage sees the blob only after verification, through the Commit hook.
package fill

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
)

// FetchFunc performs the origin request for a fill. It runs on the fill's own context.
type FetchFunc func(ctx context.Context) (*http.Response, error)

// CommitFunc stores a verified fill. spoolPath holds exactly the blob; the hook may move
// it (the spool file descriptor stays valid for readers still streaming).
type CommitFunc func(ctx context.Context, f *Fill, spoolPath string) error

// Key identifies a fill. The registry is part of it: bytes fetched from one registry are
// never handed to a client asking another (provenance).
type Key struct {
	Registry string
	Digest   digest.Digest
}

// Manager owns the in-flight fills.
type Manager struct {
	dir          string
	commit       CommitFunc
	stallTimeout time.Duration
	bufSize      int
	log          *slog.Logger
	onBytes      func(registry string, n int)
	onDone       func(f *Fill, err error)

	mu    sync.Mutex
	fills map[Key]*Fill
}

// Option configures a Manager.
type Option func(*Manager)

// WithStallTimeout fails a fill whose origin sends no byte for d (default 30 s).
func WithStallTimeout(d time.Duration) Option { return func(m *Manager) { m.stallTimeout = d } }

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(m *Manager) { m.log = l } }

// WithOriginBytes is called for every chunk read from an origin.
func WithOriginBytes(fn func(registry string, n int)) Option {
	return func(m *Manager) { m.onBytes = fn }
}

// WithDone is called once per fill when it ends, with nil for a verified blob.
func WithDone(fn func(f *Fill, err error)) Option { return func(m *Manager) { m.onDone = fn } }

// NewManager spools fills under dir (emptied first: leftovers of a crash are never
// trusted) and stores verified blobs with commit.
func NewManager(dir string, commit CommitFunc, opts ...Option) (*Manager, error) {
	if err := os.RemoveAll(dir); err != nil {
		return nil, fmt.Errorf("clean spool directory: %w", err)
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("create spool directory: %w", err)
	}
	m := &Manager{
		dir:          dir,
		commit:       commit,
		stallTimeout: 30 * time.Second,
		bufSize:      1 << 20,
		log:          slog.Default(),
		fills:        map[Key]*Fill{},
	}
	for _, o := range opts {
		o(m)
	}
	return m, nil
}

// Join returns the fill for key, starting it with fetch when none is in flight. started
// says whether this call started it (the caller's credentials made the origin request).
// The caller must Release the fill when done reading.
func (m *Manager) Join(key Key, owner string, fetch FetchFunc) (f *Fill, started bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if f := m.fills[key]; f != nil {
		f.refs++
		return f, false
	}
	f = &Fill{
		Key:     key,
		Owner:   owner,
		m:       m,
		refs:    2, // the caller's and the fill goroutine's
		changed: make(chan struct{}),
		settled: make(chan struct{}),
		size:    -1,
		started: time.Now(),
	}
	m.fills[key] = f
	go f.run(fetch)
	return f, true
}

// Lookup returns the in-flight fill for key, acquired (the caller must Release it), or
// nil when there is none. It never starts a fill.
func (m *Manager) Lookup(key Key) *Fill {
	m.mu.Lock()
	defer m.mu.Unlock()
	f := m.fills[key]
	if f != nil {
		f.refs++
	}
	return f
}

// InFlight returns the number of fills running (for tests and metrics).
func (m *Manager) InFlight() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.fills)
}

// Response is the origin's answer to a fill's request.
type Response struct {
	Status int
	Header http.Header
	// Body is the origin's body for a non-200 answer (at most 64 KiB), relayed to the
	// client that started the fill: 401 challenges and error documents go back unchanged.
	Body []byte
}

// ErrFailed wraps every error that ends a fill; ErrRefused, a fill whose origin answered
// with something other than 200 (a 401 challenge, a 404).
var (
	ErrFailed  = errors.New("fill failed")
	ErrRefused = errors.New("origin refused the fill")
)

// Fill is one origin fetch of one blob.
type Fill struct {
	Key Key
	// Owner identifies who started the fill (a hash of credential and repository), so a
	// request with the same owner needs no separate authorization.
	Owner string

	m       *Manager
	started time.Time
	settled chan struct{} // closed when the fill has ended and its commit, if any, is done

	mu       sync.Mutex
	refs     int
	changed  chan struct{} // closed and replaced at every change
	resp     *Response     // set once the origin answered
	size     int64         // from Content-Length; -1 until known
	written  int64         // bytes in the spool
	verified bool          // the whole body matched digest and size
	err      error         // terminal failure
	file     *os.File
}

// Release drops the caller's reference; the spool is closed when the last one goes.
func (f *Fill) Release() {
	f.m.mu.Lock()
	f.refs--
	last := f.refs == 0
	f.m.mu.Unlock()
	if last {
		f.mu.Lock()
		file := f.file
		f.file = nil
		f.mu.Unlock()
		if file != nil {
			file.Close()
			os.Remove(file.Name()) // gone already when committed; removes a failed spool
		}
	}
}

// Response waits until the origin answers the fill's request. err is the fill's failure
// when it ended before any answer (connection refused, timeout).
func (f *Fill) Response(ctx context.Context) (*Response, error) {
	for {
		f.mu.Lock()
		resp, err, ch := f.resp, f.err, f.changed
		f.mu.Unlock()
		if resp != nil {
			return resp, nil
		}
		if err != nil {
			return nil, err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Size returns the blob's size once known from the origin's Content-Length (or, when
// the origin sent none, once the fill is verified); -1 before.
func (f *Fill) Size() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.size
}

// WaitSize waits until the size is known.
func (f *Fill) WaitSize(ctx context.Context) (int64, error) {
	for {
		f.mu.Lock()
		size, err, ch := f.size, f.err, f.changed
		f.mu.Unlock()
		if size >= 0 {
			return size, nil
		}
		if err != nil {
			return -1, err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return -1, ctx.Err()
		}
	}
}

// Done reports whether the fill ended, and its error.
func (f *Fill) Done() (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.verified || f.err != nil, f.err
}

// NewReader reads bytes [off, off+n) of the blob as they arrive (n < 0: to the end). A
// failed fill ends the read with an error wrapping ErrFailed, never with a clean EOF.
func (f *Fill) NewReader(ctx context.Context, off, n int64) io.Reader {
	end := off + n
	if n < 0 {
		end = math.MaxInt64
	}
	return &reader{f: f, ctx: ctx, off: off, end: end}
}

type reader struct {
	f        *Fill
	ctx      context.Context
	off, end int64
}

func (r *reader) Read(p []byte) (int, error) {
	if r.off >= r.end {
		return 0, io.EOF
	}
	avail, err := r.wait()
	if err != nil {
		return 0, err
	}
	if avail < 0 {
		return 0, r.pastEnd()
	}
	r.f.mu.Lock()
	file := r.f.file
	r.f.mu.Unlock()
	if file == nil {
		return 0, fmt.Errorf("%w: spool closed", ErrFailed)
	}
	n := min(int64(len(p)), avail-r.off, r.end-r.off)
	got, rerr := file.ReadAt(p[:n], r.off)
	r.off += int64(got)
	if rerr != nil && !(rerr == io.EOF && int64(got) == n) {
		return got, fmt.Errorf("%w: read spool: %v", ErrFailed, rerr)
	}
	return got, nil
}

// pastEnd is the end of a read that reached the end of the verified blob: a clean EOF
// for a read to the end, an error for a range that runs past it.
func (r *reader) pastEnd() error {
	if r.end == math.MaxInt64 {
		return io.EOF
	}
	return io.ErrUnexpectedEOF
}

// WriteTo streams the reader's range to w. Bytes already in the spool go with one copy
// per available run, from the reader's own descriptor of the spool file, so a network
// writer can use sendfile(2) instead of 32 KiB user-space copies.
func (r *reader) WriteTo(w io.Writer) (int64, error) {
	r.f.mu.Lock()
	file := r.f.file
	r.f.mu.Unlock()
	var own *os.File
	if file != nil {
		// /proc/self/fd keeps working after the spool is renamed into storage, and gives
		// this reader a file offset of its own.
		own, _ = os.Open(fmt.Sprintf("/proc/self/fd/%d", file.Fd()))
	}
	if own == nil {
		return io.Copy(w, readerOnly{r})
	}
	defer own.Close()
	var total int64
	for r.off < r.end {
		avail, err := r.wait()
		if err != nil {
			return total, err
		}
		if avail < 0 {
			if err := r.pastEnd(); err != io.EOF {
				return total, err
			}
			return total, nil
		}
		if _, err := own.Seek(r.off, io.SeekStart); err != nil {
			return total, fmt.Errorf("%w: seek spool: %v", ErrFailed, err)
		}
		want := min(avail, r.end) - r.off
		n, err := io.Copy(w, io.LimitReader(own, want))
		r.off += n
		total += n
		if err != nil {
			return total, err
		}
		if n != want {
			return total, fmt.Errorf("%w: short spool read", ErrFailed)
		}
	}
	return total, nil
}

// wait blocks until bytes past r.off are readable and returns the readable end (the last
// byte withheld until the body is verified), or -1 when the blob ended before r.off.
func (r *reader) wait() (int64, error) {
	for {
		r.f.mu.Lock()
		avail, verified := r.f.written, r.f.verified
		if !verified && avail > 0 {
			avail--
		}
		err, ch := r.f.err, r.f.changed
		r.f.mu.Unlock()
		if err != nil {
			return 0, err
		}
		if r.off < avail {
			return avail, nil
		}
		if verified {
			return -1, nil
		}
		select {
		case <-ch:
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
}

// readerOnly hides WriteTo, for the plain-copy fallback.
type readerOnly struct{ r *reader }

func (o readerOnly) Read(p []byte) (int, error) { return o.r.Read(p) }

// notify wakes every waiter; f.mu must be held.
func (f *Fill) notify() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// forget takes a failed fill out of the in-flight map at once, so the next request starts
// a fresh one instead of joining a dead fill.
func (f *Fill) forget() {
	f.m.mu.Lock()
	if f.m.fills[f.Key] == f {
		delete(f.m.fills, f.Key)
	}
	f.m.mu.Unlock()
}

func (f *Fill) fail(err error) {
	f.forget()
	f.mu.Lock()
	if f.err == nil && !f.verified {
		f.err = fmt.Errorf("%w: %s from %s: %w", ErrFailed, f.Key.Digest, f.Key.Registry, err)
		f.notify()
	}
	f.mu.Unlock()
}

func (f *Fill) run(fetch FetchFunc) {
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	err := f.fetch(ctx, cancel, fetch)
	if err != nil {
		f.fail(err)
		f.m.log.Warn("fill failed", "registry", f.Key.Registry, "digest", f.Key.Digest, "error", err)
	}
	f.mu.Lock()
	resp := f.resp
	f.mu.Unlock()
	if err == nil && resp != nil && resp.Status == http.StatusOK {
		if cerr := f.m.commit(ctx, f, f.file.Name()); cerr != nil {
			// Clients were served a verified body; only the cache copy is lost.
			f.m.log.Error("storing verified blob failed", "registry", f.Key.Registry, "digest", f.Key.Digest, "error", cerr)
		}
	}
	if f.m.onDone != nil {
		var doneErr error
		f.mu.Lock()
		doneErr = f.err
		f.mu.Unlock()
		f.m.onDone(f, doneErr)
	}
	f.forget()
	close(f.settled)
	f.Release()
}

// Settled is closed when the fill has ended: failed, or verified and committed.
func (f *Fill) Settled() <-chan struct{} { return f.settled }

// Elapsed is how long the fill has run.
func (f *Fill) Elapsed() time.Duration { return time.Since(f.started) }

func (f *Fill) fetch(ctx context.Context, cancel context.CancelCauseFunc, fetch FetchFunc) error {
	res, err := fetch(ctx)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
		f.forget()
		f.mu.Lock()
		f.resp = &Response{Status: res.StatusCode, Header: res.Header.Clone(), Body: body}
		f.err = fmt.Errorf("%w: %w: origin answered %d", ErrFailed, ErrRefused, res.StatusCode)
		f.notify()
		f.mu.Unlock()
		return nil
	}
	file, err := os.CreateTemp(f.m.dir, "fill-*")
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.file = file
	f.resp = &Response{Status: res.StatusCode, Header: res.Header.Clone()}
	f.size = res.ContentLength
	f.notify()
	f.mu.Unlock()

	// A stalled origin body would hang every reader: cancel the fetch when no byte
	// arrives for stallTimeout.
	stall := time.AfterFunc(f.m.stallTimeout, func() {
		cancel(fmt.Errorf("origin sent no data for %s", f.m.stallTimeout))
	})
	defer stall.Stop()

	verifier := f.Key.Digest.Verifier()
	buf := make([]byte, f.m.bufSize)
	batch := min(f.m.bufSize, 128<<10)
	var written int64
	for {
		// At least batch bytes per round: fewer spool writes and fewer wake-ups of every
		// reader, which is most of a fill's CPU besides hashing. A short read at the end
		// of the body returns what there is.
		n, rerr := io.ReadAtLeast(res.Body, buf, batch)
		if rerr == io.ErrUnexpectedEOF {
			rerr = io.EOF
		}
		if n > 0 {
			stall.Reset(f.m.stallTimeout)
			if f.size >= 0 && written+int64(n) > f.size {
				return fmt.Errorf("%w: origin sent more than Content-Length %d", errdefs.ErrFailedPrecondition, f.size)
			}
			if _, err := file.WriteAt(buf[:n], written); err != nil {
				return fmt.Errorf("write spool: %w", err)
			}
			_, _ = verifier.Write(buf[:n])
			written += int64(n)
			if f.m.onBytes != nil {
				f.m.onBytes(f.Key.Registry, n)
			}
			f.mu.Lock()
			f.written = written
			f.notify()
			f.mu.Unlock()
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			if cause := context.Cause(ctx); cause != nil {
				return cause
			}
			return fmt.Errorf("read origin body: %w", rerr)
		}
	}
	if f.size >= 0 && written != f.size {
		return fmt.Errorf("%w: origin sent %d of %d bytes", errdefs.ErrFailedPrecondition, written, f.size)
	}
	if !verifier.Verified() {
		return fmt.Errorf("%w: origin body does not match its digest", errdefs.ErrFailedPrecondition)
	}
	f.mu.Lock()
	f.size = written
	f.verified = true
	f.notify()
	f.mu.Unlock()
	return nil
}
