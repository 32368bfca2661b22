// Package fill runs one origin fetch per missing blob and streams it to every client that
// asks for the blob while it arrives.
//
// A fill spools the origin's body to a local file and publishes how much of it is there;
// readers (one per client request, each with its own byte range) read the spool with
// ReadAt as it grows. The last byte is withheld until the whole body has been checked
// against its digest and size, so no client ever receives a complete body that is wrong:
// a truncated or corrupt fill ends every reader with an error instead.
//
// When the store cannot take the blob (the spool cannot be created or written, or the
// reservation is refused), the fill passes it through: it keeps streaming from the origin
// to its readers through a bounded window of the most recent bytes (see window.go), and
// stores nothing. The next fill tries the store again.
//
// Fills run on their own context: a client that disconnects does not cancel the fetch
// for the others. Storage sees the blob only after verification, through the Commit hook.
package fill

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
)

// FetchFunc performs the origin request for a fill. It runs on the fill's own context.
// It asks for the blob's bytes from from through to (inclusive; to < 0: to the end),
// with the header RangeHeader(from, to). The first request is (0, -1), the whole body; a
// fill whose origin connection dropped mid-body asks again for the bytes it lacks, and a
// fill fetched in parallel ranges (parallel.go) asks for bounded ones. The fill checks
// the answer: a 206 whose Content-Range is the range asked with the blob's size, or a
// 200 (the origin ignored the range: the whole body).
type FetchFunc func(ctx context.Context, from, to int64) (*http.Response, error)

// RangeHeader is the header a FetchFunc adds to ask for bytes from through to (to < 0:
// to the end): nil for the whole body. A blob is addressed by its digest, which the fill
// verifies end to end, so no If-Range validator is needed: the 206's Content-Range and
// the digest are the validation.
func RangeHeader(from, to int64) http.Header {
	if from <= 0 && to < 0 {
		return nil
	}
	v := "bytes=" + strconv.FormatInt(max(from, 0), 10) + "-"
	if to >= 0 {
		v += strconv.FormatInt(to, 10)
	}
	return http.Header{"Range": {v}}
}

// CommitFunc stores a verified fill. spoolPath holds exactly the blob; the hook may move
// it (the spool file descriptor stays valid for readers still streaming).
type CommitFunc func(ctx context.Context, f *Fill, spoolPath string) error

// ReserveFunc reserves room in the store for a blob of size bytes before a fill spools it. An error means the blob is not stored: the fill passes it through to its clients. release is called exactly once when the fill ends, with stored reporting whether the blob was committed.
//
// size is -1 when the origin sent no Content-Length. The fill waits for the answer
// before its clients get any byte, so the function should answer quickly.
type ReserveFunc func(ctx context.Context, key Key, size int64) (release func(stored bool), err error)

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
	reserve      ReserveFunc
	stallTimeout time.Duration
	bufSize      int
	window       int // bytes a pass-through fill keeps for its readers
	lag          time.Duration
	log          *slog.Logger
	onBytes      func(registry string, n int)
	onDone       func(f *Fill, err error)
	events       Events
	health       health
	ranges       rangePolicy // parallel ranged fills (parallel.go)
	// credentialWait: how long a fill whose credentials were all refused waits for a
	// fresh one (handover.go).
	credentialWait time.Duration

	mu    sync.Mutex
	fills map[Key]*Fill
	// stored remembers fills that stored their blob, for a moment: a request that found
	// the store without the blob just before the fill committed, and asks to join just
	// after it ended, is sent back to the store instead of starting a second origin fetch.
	stored map[Key]time.Time
}

// storedMemory is how long a stored fill's key is remembered (see Manager.stored).
const storedMemory = 10 * time.Second

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

// WithReserve has every fill reserve room in the store once the origin's size is known,
// before it spools; a refusal passes the blob through unstored.
func WithReserve(fn ReserveFunc) Option { return func(m *Manager) { m.reserve = fn } }

// WithPassThroughWindow sets how many of the most recent bytes a pass-through fill keeps
// in memory for its readers (default 4 MiB, at least 64 KiB). It is the memory such a
// fill costs, whatever the blob's size.
func WithPassThroughWindow(n int) Option {
	return func(m *Manager) { m.window = max(n, 64<<10) }
}

// WithPassThroughLag sets how long a pass-through fill waits for a reader about to fall
// out of its window before it cuts that reader off (default 2 s; 0: at once). The fill
// goes as fast as its slowest reader that keeps moving; a reader that stops for longer
// is cut off, and its client resumes with a Range request.
func WithPassThroughLag(d time.Duration) Option {
	return func(m *Manager) { m.lag = max(d, 0) }
}

// WithEvents sets the hooks the store's health metrics are made of.
func WithEvents(ev Events) Option { return func(m *Manager) { m.events = ev } }

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
		dir:            dir,
		commit:         commit,
		stallTimeout:   30 * time.Second,
		bufSize:        4 << 20,
		window:         4 << 20,
		lag:            2 * time.Second,
		log:            slog.Default(),
		ranges:         defaultRanges,
		credentialWait: defaultCredentialWait,
		fills:          map[Key]*Fill{},
		stored:         map[Key]time.Time{},
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
	return m.join(key, owner, 0, fetch, false)
}

// JoinAt is Join for a caller that will read from byte from on. A fill passing its blob
// through can serve only readers whose bytes are still in its spool or window: for any
// other, JoinAt starts a fresh fill (a new origin fetch, which tries the store again)
// and makes it the one later callers join; the old fill goes on for its own readers.
//
// It returns nil (and started false) when no fill is in flight because one stored the
// blob moments ago: the caller reads the store, and calls ForgetStored before joining
// again if the blob is not there after all.
func (m *Manager) JoinAt(key Key, owner string, from int64, fetch FetchFunc) (f *Fill, started bool) {
	return m.join(key, owner, from, fetch, true)
}

func (m *Manager) join(key Key, owner string, from int64, fetch FetchFunc, storedToo bool) (f *Fill, started bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if f := m.fills[key]; f != nil && f.serves(from) {
		f.refs++
		f.hold(from)
		f.addFetcher(owner, fetch) // its credential may carry the fill on (handover.go)
		return f, false
	}
	if at, ok := m.stored[key]; storedToo && ok && m.fills[key] == nil && time.Since(at) < storedMemory {
		return nil, false
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
		readers: map[*reader]struct{}{},
	}
	f.fetchers = []fetcher{{owner: owner, fetch: fetch}}
	f.hold(from)
	m.fills[key] = f
	go f.run(fetch)
	return f, true
}

// Lookup returns the in-flight fill for key, acquired (the caller must Release it), for
// a caller that will read it from byte 0; nil when there is none, or when it passes its
// blob through and byte 0 is gone. It never starts a fill.
func (m *Manager) Lookup(key Key) *Fill {
	m.mu.Lock()
	defer m.mu.Unlock()
	f := m.fills[key]
	if f == nil || !f.serves(0) {
		return nil
	}
	f.refs++
	f.hold(0)
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
// with something other than 200 (a 401 challenge, a 404). ErrBehind ends a reader that
// fell behind a pass-through fill's window: the fill goes on, the client resumes.
var (
	ErrFailed  = errors.New("fill failed")
	ErrRefused = errors.New("origin refused the fill")
	ErrBehind  = errors.New("reader fell behind the pass-through window")
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
	refs     int           // guarded by m.mu
	changed  chan struct{} // closed and replaced at every change
	resp     *Response     // set once the origin answered
	size     int64         // from Content-Length; -1 until known
	received int64         // bytes received from the origin (readable, but for the last)
	spooled  int64         // bytes in the spool file: all received ones unless passing through
	verified bool          // the whole body matched digest and size
	err      error         // terminal failure
	file     *os.File
	onClose  []func() // run once the spool is closed (OnClose)
	closed   bool     // the last reference was released
	sent     bool     // a reader was given bytes: a resume can no longer start over

	// Passing through (see window.go).
	pass     bool                 // the store did not take the blob: nothing more is spooled
	win      *window              // the most recent bytes, for readers past the spool
	readers  map[*reader]struct{} // active readers, for the window's flow control
	holds    []hold               // joiners not reading yet, for the same
	waiting  bool                 // the fill waits for readers to move
	progress chan struct{}        // closed when a reader moves while the fill waits

	par       *parallel // set while the blob is fetched in ranges (parallel.go)
	fetchers  []fetcher // the credentials that may carry the fill on (handover.go)
	cur       int       // the fetcher origin requests use now
	starving  bool      // every fetcher was refused: the fill waits for a fresh one
	starveGen int       // waits begun: a reader made before the current one is cut off
}

// Release drops the caller's reference; the spool is closed when the last one goes.
func (f *Fill) Release() {
	f.m.mu.Lock()
	f.refs--
	last := f.refs == 0
	f.m.mu.Unlock()
	if last {
		f.mu.Lock()
		file, onClose := f.file, f.onClose
		f.file, f.onClose = nil, nil
		f.win = nil // the window's memory goes with the last reader
		f.closed = true
		f.mu.Unlock()
		if file != nil {
			file.Close()
			os.Remove(file.Name()) // gone already when committed; removes a failed spool
		}
		for _, fn := range onClose {
			fn()
		}
	}
}

// OnClose runs fn once the last reader has released the fill and its spool is closed
// (at once when that has happened already). A commit hook uses it to hold the stored blob
// while clients still read the spool.
func (f *Fill) OnClose(fn func()) {
	f.mu.Lock()
	if !f.closed {
		f.onClose = append(f.onClose, fn)
		fn = nil
	}
	f.mu.Unlock()
	if fn != nil {
		fn()
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

// PassingThrough reports whether the store did not take this fill's blob: it is streamed
// to its readers and not stored.
func (f *Fill) PassingThrough() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pass
}

// Settled is closed when the fill has ended: failed, or verified and committed.
func (f *Fill) Settled() <-chan struct{} { return f.settled }

// Elapsed is how long the fill has run.
func (f *Fill) Elapsed() time.Duration { return time.Since(f.started) }

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

// forgetStored is forget for a fill that stored its blob: its key is remembered for
// storedMemory (see Manager.stored).
func (f *Fill) forgetStored() {
	m := f.m
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.fills[f.Key] == f {
		delete(m.fills, f.Key)
	}
	now := time.Now()
	for k, at := range m.stored { // few entries: the fills of the last seconds
		if now.Sub(at) >= storedMemory {
			delete(m.stored, k)
		}
	}
	m.stored[f.Key] = now
}

// ForgetStored drops the memory that a fill stored key's blob (the caller found the
// store without it: evicted since), so the next JoinAt starts a fill.
func (m *Manager) ForgetStored(key Key) {
	m.mu.Lock()
	delete(m.stored, key)
	m.mu.Unlock()
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
