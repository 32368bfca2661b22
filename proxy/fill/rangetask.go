package fill

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/containerd/errdefs"
)

// runTask fetches the bytes of t, from s when given, resuming from its last byte
// received when a connection drops (at most maxResumes times). A nil error with bytes
// left means the origin ignores ranges (p.noRanges): the range is left to the first
// stream.
func (f *Fill) runTask(p *parallel, t *task, s *stream, buf []byte) error {
	resumes := 0
	var cut error
	for {
		if s == nil {
			if cut != nil {
				if resumes >= maxResumes {
					f.m.resumed(ResumeFailed)
					return fmt.Errorf("%w (after %d resumes)", cut, resumes)
				}
				resumes++
				tm := time.NewTimer(time.Duration(resumes) * resumeBackoff)
				select {
				case <-tm.C:
				case <-p.ctx.Done():
					tm.Stop()
					return context.Cause(p.ctx)
				}
			}
			var err error
			if s, err = f.openRange(p, t); err != nil {
				if errors.Is(err, errCut) && p.ctx.Err() == nil {
					cut = err
					continue
				}
				return err
			}
			if s == nil {
				return nil // the origin ignores ranges
			}
			if cut != nil {
				f.m.resumed(ResumeRanged)
				f.m.log.Info("origin connection dropped mid-range: range resumed", "registry", f.Key.Registry,
					"digest", f.Key.Digest, "at", t.next, "resumes", resumes, "cause", redact(cut))
			}
		}
		err := f.readTask(p, t, s, buf)
		s.close()
		s = nil
		if err == nil {
			return nil
		}
		if !errors.Is(err, errCut) || p.ctx.Err() != nil {
			return err
		}
		cut = err
	}
}

// openRange asks the origin for t's bytes from t.next on. It returns nil and no error
// when the origin answered with the whole body (it ignores ranges); an error wrapping
// errCut may be tried again.
func (f *Fill) openRange(p *parallel, t *task) (*stream, error) {
	attempt, stop := context.WithCancelCause(p.ctx)
	res, err := f.originFetch(attempt, t.next, t.hi-1)
	if err != nil {
		stop(nil)
		if errors.Is(err, errCredential) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: range %d-%d: %w", errCut, t.next, t.hi-1, err)
	}
	switch res.StatusCode {
	case http.StatusPartialContent:
		cr := res.Header.Get("Content-Range")
		start, end, total, ok := parseContentRangeSpan(cr)
		if !ok || start != t.next || end != t.hi-1 || total != p.size || (res.ContentLength >= 0 && res.ContentLength != t.hi-t.next) {
			res.Body.Close()
			stop(nil)
			return nil, fmt.Errorf("%w: origin answered range %d-%d of %d with Content-Range %q", errdefs.ErrFailedPrecondition, t.next, t.hi-1, p.size, cr)
		}
		f.mu.Lock()
		t.confirmed = true
		f.notify()
		f.mu.Unlock()
		return &stream{body: res.Body, attempt: attempt, stop: stop}, nil
	case http.StatusOK:
		res.Body.Close()
		stop(nil)
		if res.ContentLength >= 0 && res.ContentLength != p.size {
			return nil, fmt.Errorf("%w: origin answered a range with a %d-byte body for a %d-byte blob", errdefs.ErrFailedPrecondition, res.ContentLength, p.size)
		}
		f.mu.Lock()
		was := p.noRanges
		p.noRanges = true
		f.notify()
		f.mu.Unlock()
		if !was {
			f.m.log.Info("origin ignores ranges: fetching the blob in one stream", "registry", f.Key.Registry, "digest", f.Key.Digest)
		}
		return nil, nil
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, 64<<10))
	res.Body.Close()
	stop(nil)
	err = fmt.Errorf("origin answered range %d-%d with %d", t.next, t.hi-1, res.StatusCode)
	if res.StatusCode >= 500 {
		return nil, fmt.Errorf("%w: %w", errCut, err) // the origin may be back in a moment
	}
	return nil, fmt.Errorf("%w: %w", errdefs.ErrFailedPrecondition, err)
}

// readTask reads s into t's place in the spool until t is whole. The first stream goes
// on past t while the next range is unclaimed (extend). An error wrapping errCut is a
// body cut short.
func (f *Fill) readTask(p *parallel, t *task, s *stream, buf []byte) error {
	stall := time.AfterFunc(f.m.stallTimeout, func() {
		s.stop(fmt.Errorf("origin sent no data for %s", f.m.stallTimeout))
	})
	defer stall.Stop()
	for {
		if t.next == t.hi {
			if !s.open || !f.extend(p, t) {
				return nil
			}
			stall.Reset(f.m.stallTimeout)
		}
		chunk := buf[:min(int64(len(buf)), t.hi-t.next)]
		n, rerr := readRound(s.body, chunk, min(roundBytes, len(chunk)), roundWait, func() { stall.Reset(f.m.stallTimeout) })
		if rerr == io.ErrUnexpectedEOF {
			rerr = io.EOF
		}
		if n > 0 {
			if f.m.onBytes != nil {
				f.m.onBytes(f.Key.Registry, n)
			}
			if err := f.spoolAt(p, chunk[:n], t.next); err != nil {
				return err
			}
			f.mu.Lock()
			p.have = p.have.add(t.next, t.next+int64(n))
			t.next += int64(n)
			f.received = p.have.end(0)
			f.notify()
			f.mu.Unlock()
		}
		if rerr == io.EOF {
			if t.next < t.hi {
				return fmt.Errorf("%w: %w: origin ended range %d-%d at byte %d", errCut, errdefs.ErrFailedPrecondition, t.lo, t.hi-1, t.next)
			}
			return nil
		}
		if rerr != nil {
			if p.ctx.Err() != nil {
				return context.Cause(p.ctx)
			}
			if cause := context.Cause(s.attempt); cause != nil && cause != context.Canceled {
				rerr = cause
			}
			return fmt.Errorf("%w: read origin range: %w", errCut, rerr)
		}
	}
}

// spoolAt writes p at off in the spool. A failure stops the fill's ranges: the rest of
// the blob passes through in one stream (rangepass.go).
func (f *Fill) spoolAt(par *parallel, p []byte, off int64) error {
	for w := 0; w < len(p); {
		k := min(len(p)-w, spoolPiece)
		if _, err := f.file.WriteAt(p[w:w+k], off+int64(w)); err != nil {
			return f.spoolFailed(par, err)
		}
		w += k
	}
	return nil
}

// extend moves the end of t, read from the first stream, on to the next range when
// nobody fetches it yet (to the end once the origin is known to ignore ranges). It
// waits while a range request for those bytes is unanswered: the answer may be that the
// origin ignores ranges, and the first stream must then go on.
func (f *Fill) extend(p *parallel, t *task) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for {
		if t.hi >= p.size || p.closed || p.err != nil {
			return false
		}
		c := p.covered()
		if c.end(t.hi) == t.hi {
			limit := p.size
			if !p.noRanges {
				limit = min(t.hi+p.rangeSize, p.size)
			}
			t.hi = c.next(t.hi, limit)
			return true
		}
		pending := false
		for o := range p.tasks {
			if o != t && !o.confirmed && o.next <= t.hi && t.hi < o.hi {
				pending = true
			}
		}
		if !pending {
			return false
		}
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ch:
		case <-p.ctx.Done():
		}
		f.mu.Lock()
	}
}
