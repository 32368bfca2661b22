// Package evict bounds what cove-cache's store holds: a storage.Driver wrapper that keeps
// its own access times (nodes mount noatime), evicts the least recently used blobs with
// their records between a high and a low watermark, reserves room for fills before they
// start, never deletes a blob a client is reading, and never evicts what --pin names.
//
// It works on any storage.Driver through the interface only. Access times, sizes and the
// records that belong to each blob live in memory and in one record of the store
// (IndexKey), written periodically and at shutdown, so a restart reads one record instead
// of walking a large store; a missing, corrupt or unclean index is rebuilt by a walk in
// the background while cove-cache serves.
package evict

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/storage"
)

// Config is what a Store is built from.
type Config struct {
	// MaxSize bounds the bytes the store holds (blobs, their records, fills in flight
	// through reservations); 0: unbounded.
	MaxSize int64
	// High and Low are the watermarks, fractions of MaxSize (default 0.90 and 0.80):
	// past High, the background evictor frees down to Low.
	High, Low float64
	// MinFree is the second trigger: keep this much of the filesystem free (Free
	// reports it; a filesystem store only).
	MinFree MinFree
	Free    func() (free, total uint64, err error)
	// Pins are registry/repository:tag globs whose manifests and blobs are never evicted.
	Pins []string
	// Interval is how often the background loop checks free space and writes the index
	// when it changed (default 30 s).
	Interval time.Duration
	// PendingGrace is how long records learned for a blob not stored (a membership from
	// a HEAD) wait for their blob before they are removed (default 10 min).
	PendingGrace time.Duration
	Clock        func() time.Time
	Logger       *slog.Logger
	// Shared makes this Store one of several replicas on one bucket (shared.go): one
	// leader evicts for all, in two phases. Nil: the Store evicts for itself alone.
	Shared  *Shared
	Metrics *metrics.Store
}

// recordCost is what a record is counted as: a 4 KiB block for its file and about as
// much for its share of directories on a filesystem store.
const recordCost = 8 << 10

const blockSize = 4 << 10

func blobCost(size int64) int64 { return (size + blockSize - 1) / blockSize * blockSize }

type entry struct {
	size    int64
	atime   int64 // unix nanoseconds, cove's own access time
	refs    int   // readers open now
	records map[string]struct{}
}

func (e *entry) cost() int64 { return blobCost(e.size) + int64(len(e.records))*recordCost }

type pending struct {
	keys  map[string]struct{}
	since int64
}

// Store is a storage.Driver that bounds its inner driver. Start it before serving and
// Close it at shutdown (the index is written clean then).
type Store struct {
	inner storage.Driver
	cfg   Config
	log   *slog.Logger
	m     *metrics.Store
	now   func() time.Time
	pins  *pinSet
	sh    *sharedState // nil: not shared
	link  LeaderLink   // a follower's way to the leader's grants (guarded by mu)

	mu         sync.Mutex
	blobs      map[digest.Digest]*entry
	deleting   map[digest.Digest]struct{}
	opening    map[digest.Digest]int // opens in flight of blobs not in blobs yet
	pending    map[digest.Digest]*pending
	owner      map[string]digest.Digest // record key -> the blob it goes with
	stored     int64                    // sum of entry costs
	unlinking  int64                    // costs of the blobs deleting: on disk still
	reserved   int64
	resv       map[digest.Digest][]*reservation
	indexBytes int64
	pinned     map[digest.Digest]struct{}
	dirty      bool // changed since the index was written
	swept      bool // legacy records removed once (persisted)

	kick      chan struct{}
	syncKick  chan struct{}
	pinKick   chan struct{}
	pinsDirty atomic.Bool
	closed    atomic.Bool // the clean index is written: a later change must unmark it
	indexMu   sync.Mutex
	pinMu     sync.Mutex // one pin resolution at a time
	// evictMu: one eviction at a time. Each works out what to free from the usage it
	// reads, and two at once would both free the same excess (taken before mu).
	evictMu sync.Mutex
	cancel  context.CancelFunc
	done    chan struct{}
}

var (
	_ storage.Driver      = (*Store)(nil)
	_ storage.FileAdopter = (*Store)(nil)
	_ storage.HeldAdopter = (*Store)(nil)
)

// New wraps inner. Nothing is read until Start.
func New(inner storage.Driver, cfg Config) (*Store, error) {
	if cfg.High == 0 {
		cfg.High = 0.90
	}
	if cfg.Low == 0 {
		cfg.Low = 0.80
	}
	if cfg.Low <= 0 || cfg.High > 1 || cfg.Low >= cfg.High {
		return nil, errors.New("evict: want 0 < low < high <= 1")
	}
	if cfg.Interval == 0 {
		cfg.Interval = 30 * time.Second
	}
	if cfg.PendingGrace == 0 {
		cfg.PendingGrace = 10 * time.Minute
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Metrics == nil {
		cfg.Metrics = metrics.NewStore()
	}
	pins, err := newPinSet(cfg.Pins)
	if err != nil {
		return nil, err
	}
	s := &Store{
		inner:    inner,
		cfg:      cfg,
		log:      cfg.Logger,
		m:        cfg.Metrics,
		now:      cfg.Clock,
		pins:     pins,
		blobs:    map[digest.Digest]*entry{},
		deleting: map[digest.Digest]struct{}{},
		opening:  map[digest.Digest]int{},
		pending:  map[digest.Digest]*pending{},
		owner:    map[string]digest.Digest{},
		pinned:   map[digest.Digest]struct{}{},
		resv:     map[digest.Digest][]*reservation{},
		kick:     make(chan struct{}, 1),
		syncKick: make(chan struct{}, 1),
		pinKick:  make(chan struct{}, 1),
	}
	if cfg.Shared != nil {
		if s.sh, err = newShared(*cfg.Shared); err != nil {
			return nil, err
		}
	} else {
		s.m.EvictLeader.Set(0)
	}
	s.m.LimitBytes.Set(float64(cfg.MaxSize))
	return s, nil
}

// Inner is the wrapped driver.
func (s *Store) Inner() storage.Driver { return s.inner }

// Stat is a use: the server stats a blob before it opens it, and a blob used since the
// evictor listed its candidates is not evicted.
func (s *Store) Stat(ctx context.Context, d digest.Digest) (int64, error) {
	s.mu.Lock()
	gone := s.refusedLocked(d)
	if e := s.blobs[d]; e != nil && !gone {
		e.atime = s.now().UnixNano()
		s.dirty = true
		s.touchLocked(d, e, false)
	}
	s.mu.Unlock()
	if gone {
		return 0, errdefs.ErrNotFound
	}
	return s.inner.Stat(ctx, d)
}

// Open counts the reader until Close: a blob with readers is never evicted. It is also
// the access that makes a blob recently used.
func (s *Store) Open(ctx context.Context, d digest.Digest) (storage.Blob, error) {
	s.mu.Lock()
	if s.refusedLocked(d) {
		s.mu.Unlock()
		return nil, errdefs.ErrNotFound
	}
	e := s.blobs[d]
	if e != nil {
		e.refs++
		e.atime = s.now().UnixNano()
		s.dirty = true
		s.touchLocked(d, e, false)
	} else {
		s.opening[d]++ // a reader already, for shared eviction's open set
	}
	s.mu.Unlock()
	b, err := s.inner.Open(ctx, d)
	if e == nil {
		defer func() {
			s.mu.Lock()
			if s.opening[d]--; s.opening[d] <= 0 {
				delete(s.opening, d)
			}
			s.mu.Unlock()
		}()
	}
	if err != nil {
		if e != nil {
			s.mu.Lock()
			e.refs--
			s.mu.Unlock()
			if errdefs.IsNotFound(err) {
				s.forget(d, e) // the index was wrong about it
			}
		}
		return nil, err
	}
	if e == nil {
		e = s.added(d, b.Size(), addFound)
	}
	ob := &openBlob{Blob: b, release: func() {
		s.mu.Lock()
		e.refs--
		s.mu.Unlock()
	}}
	if s.sh != nil {
		ob.check = func() error {
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.fencedLocked() {
				return errFenced
			}
			return nil
		}
	}
	return ob, nil
}

type openBlob struct {
	storage.Blob
	once    sync.Once
	release func()
	check   func() error // shared eviction: a fenced replica's readers are cut off
}

func (b *openBlob) Read(p []byte) (int, error) {
	if b.check != nil {
		if err := b.check(); err != nil {
			return 0, err
		}
	}
	return b.Blob.Read(p)
}

func (b *openBlob) ReadAt(p []byte, off int64) (int, error) {
	if b.check != nil {
		if err := b.check(); err != nil {
			return 0, err
		}
	}
	return b.Blob.ReadAt(p, off)
}

func (b *openBlob) Close() error {
	err := b.Blob.Close()
	b.once.Do(b.release)
	return err
}

// OSFile passes the inner blob's file through, so the server can still use sendfile(2).
func (b *openBlob) OSFile() *os.File {
	if f, ok := b.Blob.(interface{ OSFile() *os.File }); ok {
		return f.OSFile()
	}
	return nil
}

func (s *Store) Put(ctx context.Context, d digest.Digest, size int64, r io.Reader) error {
	s.makeRoom(ctx, size)
	if err := s.inner.Put(ctx, d, size, r); err != nil {
		if !errdefs.IsFailedPrecondition(err) && !errdefs.IsInvalidArgument(err) && ctx.Err() == nil {
			s.m.Errors.WithLabelValues("put").Inc()
		}
		return err
	}
	s.added(d, size, addStored)
	return nil
}

// AdoptFile adopts through the inner driver when it can, else stores the file with Put.
// A fill's room was reserved before it started (Reserve).
func (s *Store) AdoptFile(ctx context.Context, d digest.Digest, size int64, path string) error {
	_, err := s.adopt(ctx, d, size, path, addStored)
	return err
}

// AdoptFileHeld adopts like AdoptFile and holds the blob as a reader until release: a
// fill's clients go on reading its spool after the commit, and on a filesystem that is
// the stored blob's own inode, whose blocks an eviction would leave allocated, past
// the bound, until they finish.
func (s *Store) AdoptFileHeld(ctx context.Context, d digest.Digest, size int64, path string) (release func(), err error) {
	e, err := s.adopt(ctx, d, size, path, addStoredHeld)
	if err != nil {
		return nil, err
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			e.refs--
			s.mu.Unlock()
		})
	}, nil
}

func (s *Store) adopt(ctx context.Context, d digest.Digest, size int64, path string, kind addKind) (*entry, error) {
	var err error
	if ad, ok := s.inner.(storage.FileAdopter); ok {
		err = ad.AdoptFile(ctx, d, size, path)
	} else {
		// Not s.Put: the fill's reservation already holds the room.
		var f *os.File
		if f, err = os.Open(path); err == nil {
			err = s.inner.Put(ctx, d, size, f)
			f.Close()
			os.Remove(path)
		}
	}
	if err != nil {
		if ctx.Err() == nil {
			s.m.Errors.WithLabelValues("put").Inc()
		}
		return nil, err
	}
	return s.added(d, size, kind), nil
}

// Delete removes a blob and the records that go with it.
func (s *Store) Delete(ctx context.Context, d digest.Digest) error {
	s.mu.Lock()
	e := s.blobs[d]
	s.mu.Unlock()
	if e != nil {
		s.forget(d, e)
		s.deleteRecords(ctx, keysOf(e.records))
	}
	return s.inner.Delete(ctx, d)
}

// PutRecord stores a record and, when it belongs to a blob (provenance, manifest type,
// membership, tag), notes it with that blob so it goes when the blob goes.
func (s *Store) PutRecord(ctx context.Context, key string, value []byte) error {
	d, ok := recordDigest(key, value)
	if ok {
		s.attach(key, d) // before the write: a sweep never mistakes it for an orphan
	}
	if err := s.inner.PutRecord(ctx, key, value); err != nil {
		if ok {
			s.detach(key)
		}
		return err
	}
	if ok && s.pins.matches(key) {
		s.pins.setRoot(key, d)
		s.kickPins()
	} else if len(s.pins.patterns) > 0 && strings.HasPrefix(key, "manifesttype/") {
		s.kickPins() // a pinned image's child manifest may just have been stored
	}
	if ok {
		s.changedAfterClose()
	}
	return nil
}

func (s *Store) GetRecord(ctx context.Context, key string) ([]byte, error) {
	return s.inner.GetRecord(ctx, key)
}

func (s *Store) DeleteRecord(ctx context.Context, key string) error {
	s.detach(key)
	return s.inner.DeleteRecord(ctx, key)
}

func (s *Store) Walk(ctx context.Context, fn func(storage.BlobInfo) error) error {
	return s.inner.Walk(ctx, fn)
}

func (s *Store) ListRecords(ctx context.Context, prefix string, fn func(key string) error) error {
	return s.inner.ListRecords(ctx, prefix, fn)
}

// How a blob came to be added to the accounting.
type addKind int

const (
	addStored     addKind = iota // new in the store: a Put, a fill, a walk, a replica's record
	addStoredHeld                // the same, held by the caller as a reader until it releases it
	addFound                     // found by a reader (Open) though the index missed it
)

// added accounts a stored blob (or touches it when known) and attaches the records that
// were waiting for it. A held or found blob counts one reader the caller must release.
func (s *Store) added(d digest.Digest, size int64, kind addKind) *entry {
	s.mu.Lock()
	e := s.blobs[d]
	fresh := e == nil
	if e == nil {
		e = &entry{size: size, records: map[string]struct{}{}}
		s.blobs[d] = e
		if p := s.pending[d]; p != nil {
			for k := range p.keys {
				e.records[k] = struct{}{}
			}
			delete(s.pending, d)
		}
		s.stored += e.cost()
		// A fill's room now counts as stored: its reservation ends at commit.
		if list := s.resv[d]; len(list) > 0 {
			s.endReservationLocked(d, list[0], true)
		}
	}
	if kind != addStored {
		e.refs++
	}
	announce := fresh && kind != addFound
	e.atime = s.now().UnixNano()
	s.dirty = true
	s.touchLocked(d, e, announce)
	s.gaugesLocked()
	s.mu.Unlock()
	s.kickEvict()
	if announce {
		s.kickSync()
	}
	s.changedAfterClose()
	return e
}

// changedAfterClose rewrites the index unclean when the store changes after Close wrote
// it clean (a fill that ended during shutdown): the next start then walks the store
// rather than trust an index that misses a blob.
func (s *Store) changedAfterClose() {
	if s.closed.Load() {
		_ = s.writeIndex(context.Background(), false)
	}
}

// forget drops a blob from the accounting (its records' owners too).
func (s *Store) forget(d digest.Digest, e *entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.blobs[d] != e {
		return
	}
	delete(s.blobs, d)
	for k := range e.records {
		delete(s.owner, k)
	}
	s.stored -= e.cost()
	s.dirty = true
	s.gaugesLocked()
}

func (s *Store) kickEvict() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

func (s *Store) kickPins() {
	if len(s.pins.patterns) == 0 {
		return
	}
	s.pinsDirty.Store(true)
	select {
	case s.pinKick <- struct{}{}:
	default:
	}
}

// gaugesLocked publishes the accounting; s.mu must be held.
func (s *Store) gaugesLocked() {
	if s.sh != nil && !s.sh.leader {
		// A follower shows the leader's account of the bucket.
		u := s.sh.usage
		s.m.StoredBytes.Set(float64(u.Stored))
		s.m.ReservedBytes.Set(float64(s.reserved))
		s.m.Blobs.Set(float64(u.Blobs))
		s.m.PinnedBytes.Set(float64(u.Pinned))
		return
	}
	s.m.StoredBytes.Set(float64(s.stored + s.indexBytes))
	s.m.ReservedBytes.Set(float64(s.reserved))
	s.m.Blobs.Set(float64(len(s.blobs)))
	var pinned int64
	for d := range s.pinned {
		if e := s.blobs[d]; e != nil {
			pinned += e.size
		}
	}
	s.m.PinnedBytes.Set(float64(pinned))
}
