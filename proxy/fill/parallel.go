package fill

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"

	"github.com/containerd/errdefs"
)

// A large blob whose store took it is fetched in ranges, several at once: one TCP
// stream's rate is bounded by its window over the round trip (an origin across a WAN, a
// CDN capping each connection), so N streams bring the blob up to N times sooner.
//
// The fill's first request stays the plain GET of the whole body: its Content-Length
// decides (WithParallelMin), and its body becomes the first range's stream. Workers
// (WithParallel of them) claim the lowest range nobody fetches yet (WithRangeSize bytes)
// and ask the origin for it ("Range: bytes=a-b", FetchFunc(ctx, a, b)); the first stream
// goes on past its range for as long as the next one is unclaimed. Each range is
// written to its place in the spool and resumed from its last byte received when its
// connection drops (the same policy as a single stream's, resume.go). Readers read
// the spans that are there (segments.go); a reader waiting for bytes nobody fetches yet
// has them fetched at once, on top of the workers (ahead.go).
//
// SHA-256 is sequential: the fill hashes the contiguous prefix as it grows, reading it
// back from the spool, which the page cache still holds. Hashing ranges in order from
// memory would need every range that arrived early kept in memory (unbounded for a range
// far ahead); reading back costs 7-30 % more CPU than hashing from memory (measured:
// 256 MiB, 1 MiB reads). The whole blob is verified before the last byte of a
// full-body read is released and before it is stored.
//
// An origin that answers a range with 200 (it ignores ranges) makes the fill go on in
// one stream: the first stream runs to the end. A fill whose spool fails while it
// spools ranges (no space, quota, I/O error, read-only) does not end: it stops its
// ranges, keeps the contiguous prefix it spooled for the readers behind it, and fetches
// the rest in one stream, passing it through unstored (rangepass.go). The store is then
// degraded, and the next fills start in one stream until a blob is stored again.

// rangePolicy says which blobs are fetched in ranges, and how.
type rangePolicy struct {
	workers int   // ranges fetched at once (1: one stream)
	size    int64 // bytes of a range
	min     int64 // the smallest blob fetched in ranges
}

// defaultRanges fetches every blob in one stream (WithParallel turns ranges on).
var defaultRanges = rangePolicy{workers: 1, size: 16 << 20, min: 64 << 20}

// WithParallel fetches a blob of at least WithParallelMin bytes in n ranges at once
// (default 1: one stream per blob).
func WithParallel(n int) Option { return func(m *Manager) { m.ranges.workers = max(n, 1) } }

// WithRangeSize sets the bytes of one range of a parallel fill (default 16 MiB, at
// least 64 KiB).
func WithRangeSize(n int64) Option { return func(m *Manager) { m.ranges.size = max(n, 64<<10) } }

// WithParallelMin sets the smallest blob fetched in ranges (default 64 MiB); a smaller
// one is fetched in one request.
func WithParallelMin(n int64) Option { return func(m *Manager) { m.ranges.min = max(n, 0) } }

// inRanges reports whether a blob of size bytes is fetched in ranges.
func (m *Manager) inRanges(size int64) bool {
	r := m.ranges
	if r.workers <= 1 || size < r.min || size <= r.size {
		return false
	}
	_, degraded := m.StoreDegraded()
	return !degraded
}

// segmentBuf is a range worker's read buffer.
const segmentBuf = 1 << 20

// parallel is a fill's state while fetched in ranges; guarded by the fill's mu.
type parallel struct {
	size, rangeSize int64
	workers         int
	have            spans              // bytes in the spool
	tasks           map[*task]struct{} // ranges being fetched
	ahead           int                // of them, fetched for a reader (ahead.go)
	exited          int                // workers that found nothing left to claim
	noRanges        bool               // the origin answered a range with the whole body
	closed          bool               // the fill is ending: nothing more is started
	err             error              // the first failure of a range
	spoolErr        error              // the spool's first failure: the rest passes through (rangepass.go)
	spoolReason     string             // its Reason
	ctx             context.Context
	cancel          context.CancelCauseFunc
	wg              sync.WaitGroup
}

// task is a range being fetched: bytes [lo, hi), of which [lo, next) are spooled.
// Only its fetching goroutine changes it, under the fill's mu.
type task struct {
	lo, next, hi int64
	confirmed    bool // the origin answered it with the range asked (or it is the first body)
}

// covered is every byte spooled or being fetched.
func (p *parallel) covered() spans {
	c := append(spans(nil), p.have...)
	for t := range p.tasks {
		c = c.add(t.next, t.hi)
	}
	return c
}

// claim takes the lowest range nobody fetches yet; nil when none is left.
func (p *parallel) claim() *task {
	if p.noRanges || p.closed || p.err != nil {
		return nil
	}
	c := p.covered()
	x := c.end(0)
	if x >= p.size {
		return nil
	}
	t := &task{lo: x, next: x, hi: c.next(x, min(x+p.rangeSize, p.size))}
	p.tasks[t] = struct{}{}
	return t
}

// stream is one origin body a task reads.
type stream struct {
	body    io.ReadCloser
	attempt context.Context // the request's: stop cancels it, with a cause
	stop    context.CancelCauseFunc
	open    bool // the first, whole body: it may go on past its task's range
}

func (s *stream) close() {
	s.body.Close()
	s.stop(nil)
}

// fetchRanges fetches the blob in ranges, the first body (attempt's, which stop ends)
// being the first range's stream, and verifies it; st's verifier hashes the prefix.
func (f *Fill) fetchRanges(ctx context.Context, first *http.Response, attempt context.Context, stop context.CancelCauseFunc, st *bodyState) error {
	r := f.m.ranges
	pctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	p := &parallel{size: f.size, rangeSize: r.size, workers: r.workers, tasks: map[*task]struct{}{}, ctx: pctx, cancel: cancel}
	head := &task{lo: 0, next: 0, hi: min(r.size, f.size), confirmed: true}
	p.tasks[head] = struct{}{}
	// The first body's request runs on the fill's context: a failed range stops it too.
	unlink := context.AfterFunc(pctx, func() { stop(context.Cause(pctx)) })
	defer unlink()
	f.mu.Lock()
	f.par = p
	f.notify()
	f.mu.Unlock()
	f.m.log.Debug("fetching blob in ranges", "registry", f.Key.Registry, "digest", f.Key.Digest,
		"size", f.size, "ranges_at_once", r.workers, "range_size", r.size)

	p.wg.Add(r.workers)
	go f.worker(p, head, &stream{body: first.Body, attempt: attempt, stop: stop, open: true})
	for i := 1; i < r.workers; i++ {
		go f.worker(p, nil, nil)
	}
	err := f.hashPrefix(p, st)
	f.mu.Lock()
	p.closed = true
	if p.err != nil {
		err = p.err
	}
	// A failed range and a failed spool exclude each other: the first closes p.
	passing := p.spoolErr != nil
	f.mu.Unlock()
	cancel(err)
	p.wg.Wait()
	if passing {
		return f.passRest(ctx, p, st) // rangepass.go
	}
	if err != nil {
		return err
	}
	if !st.verifier.Verified() {
		return fmt.Errorf("%w: origin body does not match its digest", errdefs.ErrFailedPrecondition)
	}
	f.mu.Lock()
	f.verified = true
	f.notify()
	f.mu.Unlock()
	return nil
}

// hashPrefix hashes the blob's contiguous prefix as it grows, from the spool, until it
// is whole, a range failed, or the spool failed (an error wrapping errSpoolFailed).
func (f *Fill) hashPrefix(p *parallel, st *bodyState) error {
	buf := make([]byte, 1<<20)
	for st.received < p.size {
		f.mu.Lock()
		prefix, err, spoolErr, ch := p.have.end(0), p.err, p.spoolErr, f.changed
		stuck := p.exited == p.workers && len(p.tasks) == 0 && prefix < p.size
		f.mu.Unlock()
		if err != nil {
			return err
		}
		if spoolErr != nil {
			return fmt.Errorf("%w: %w", errSpoolFailed, spoolErr)
		}
		if stuck {
			// A range was answered with the whole body after the first stream stopped.
			return fmt.Errorf("%w: origin stopped honouring ranges at byte %d", errdefs.ErrFailedPrecondition, prefix)
		}
		if prefix == st.received {
			select {
			case <-ch:
			case <-p.ctx.Done():
				return context.Cause(p.ctx)
			}
			continue
		}
		if err := f.hashSpool(st, prefix, buf); err != nil {
			return err
		}
	}
	return nil
}

// hashSpool hashes the spool's bytes from st.received up to to.
func (f *Fill) hashSpool(st *bodyState, to int64, buf []byte) error {
	for st.received < to {
		n := min(int64(len(buf)), to-st.received)
		k, rerr := f.file.ReadAt(buf[:n], st.received)
		if int64(k) != n {
			return fmt.Errorf("%w: read spool to verify: %v", errdefs.ErrUnknown, rerr)
		}
		_, _ = st.verifier.Write(buf[:n])
		st.received += n
	}
	return nil
}

// worker fetches ranges until none is left: t with s first, when given.
func (f *Fill) worker(p *parallel, t *task, s *stream) {
	defer p.wg.Done()
	buf := make([]byte, segmentBuf)
	for {
		if t == nil {
			f.mu.Lock()
			t = p.claim()
			if t == nil {
				p.exited++
				f.notify()
			}
			f.mu.Unlock()
			if t == nil {
				return
			}
		}
		err := f.runTask(p, t, s, buf)
		s = nil
		if err != nil {
			f.rangeFailed(p, err) // first: the first stream must not take the range over
		}
		f.mu.Lock()
		delete(p.tasks, t)
		if err != nil {
			p.exited++
		}
		f.notify()
		f.mu.Unlock()
		if err != nil {
			return
		}
		t = nil
	}
}

// rangeFailed ends a fill fetched in ranges with err, its first failure.
func (f *Fill) rangeFailed(p *parallel, err error) {
	f.mu.Lock()
	if p.err == nil && !p.closed {
		p.err = err
		f.notify()
	}
	f.mu.Unlock()
	p.cancel(err)
}
