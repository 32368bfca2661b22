package fill

import (
	"context"
	"errors"
	"fmt"
	"net/http"
)

// A fill fetched in ranges whose spool fails (no space, quota, I/O error, read-only
// filesystem: any error writing it) goes on, as a fill fetched in one stream does
// (window.go). Ending it would break every client's transfer: containerd never falls
// back to another host in the middle of a body (at best it asks the same host again
// from its offset, which costs a second fill and origin fetch), and a client that does
// not resume fails its pull.
//
// The failure stops every range. The blob's contiguous prefix stays in the spool,
// already hashed, for the readers behind it; bytes of ranges that arrived beyond it are
// dropped. The rest is asked of the origin in one request from the prefix's end
// ("Range: bytes=P-", FetchFunc(ctx, P, -1)) and passed through the window, hashed as it
// comes, so the fill's memory stays the window's. The whole blob is verified before its
// last byte goes to a reader, and nothing is stored. A reader ahead of the prefix (a
// lazy puller's range) gets its bytes as they come through the window.
//
// That request is answered as a resume's is (resume.go): a 206 from the prefix's end
// goes on; a 200 (the origin ignores ranges) is the whole body again, taken only while
// no reader has a byte; a request that fails is tried again with the resume policy.

// errSpoolFailed marks a failure to write the spool of a fill fetched in ranges.
var errSpoolFailed = errors.New("spool write failed")

// spoolFailed records err, a failure to write f's spool while fetching p's ranges, and
// stops the ranges so that the rest of the blob passes through (passRest). The first
// failure is counted as a store error (logged once per condition, store.go); it returns
// the error the failing range ends with.
func (f *Fill) spoolFailed(p *parallel, err error) error {
	wrapped := fmt.Errorf("%w: %w", errSpoolFailed, err)
	f.mu.Lock()
	first := p.spoolErr == nil && p.err == nil && !p.closed
	if first {
		p.spoolErr = err
		p.spoolReason = Reason(err)
		p.closed = true // nothing more is claimed, extended or fetched ahead
		f.notify()
	}
	size := f.size
	f.mu.Unlock()
	if first {
		f.m.storeFailed(f, size, "write", err)
		p.cancel(wrapped)
	}
	return wrapped
}

// passRest goes on with a fill fetched in ranges whose spool failed, once p's ranges
// have stopped: the spool's contiguous prefix stays for its readers, and the rest comes
// in one stream through the window.
func (f *Fill) passRest(ctx context.Context, p *parallel, st *bodyState) error {
	f.mu.Lock()
	prefix, reason := p.have.end(0), p.spoolReason
	f.mu.Unlock()
	if err := f.hashSpool(st, prefix, make([]byte, 1<<20)); err != nil {
		return err
	}
	f.mu.Lock()
	f.par = nil // readers now read [0, prefix) from the spool and the rest from the window
	f.received, f.spooled = prefix, prefix
	f.notify()
	f.mu.Unlock()
	f.passThrough()
	f.m.passedThrough(reason)
	f.m.log.Debug("spool failed while fetching a blob in ranges: fetching the rest in one stream, passed through unstored",
		"registry", f.Key.Registry, "digest", f.Key.Digest, "size", f.size, "from", prefix, "reason", reason)
	attempt, stop, res, err := f.openRest(ctx, st)
	if err != nil {
		return err
	}
	return f.streamBody(ctx, attempt, stop, res, st) // run.go
}

// openRest asks the origin for the blob's bytes from st.received on with the fill's
// current credential (handover.go), and checks the answer as a resume's.
func (f *Fill) openRest(ctx context.Context, st *bodyState) (context.Context, context.CancelCauseFunc, *http.Response, error) {
	attempt, stop := context.WithCancelCause(ctx)
	res, err := f.originFetch(attempt, st.received, -1)
	if err != nil {
		stop(nil)
		if errors.Is(err, errCredential) {
			return nil, nil, nil, err
		}
		// The origin may be back in a moment: tried again as a resume, while any are left.
		return f.resume(ctx, st, fmt.Errorf("%w: rest of the blob from byte %d: %w", errCut, st.received, err))
	}
	from := st.received
	outcome, err := f.restAnswer(res, st)
	if err != nil {
		res.Body.Close()
		stop(nil)
		return nil, nil, nil, err
	}
	if outcome == ResumeRestarted && from > 0 {
		f.m.log.Debug("origin ignored the range for the rest of the blob: starting it over", "registry", f.Key.Registry, "digest", f.Key.Digest, "from", from)
	}
	return attempt, stop, res, nil
}
