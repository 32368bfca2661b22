package mirror

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// watchStall cancels the cache request when the body makes no progress for
// StallTimeout and the cache fails its probe, or for SlowOriginTimeout in any case.
func (h *Handler) watchStall(ctx context.Context, ep *cacheEndpoint, progress *atomic.Int64, cancel context.CancelCauseFunc) (stop func()) {
	done := make(chan struct{})
	go func() {
		// Check often, so a stall is noticed StallTimeout after the last byte, not up to
		// twice that at the next tick.
		t := time.NewTicker(max(h.cfg.ProbeAfter/5, 10*time.Millisecond))
		defer t.Stop()
		last := progress.Load()
		lastMove, lastProbe := time.Now(), time.Time{}
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if p := progress.Load(); p != last {
				last, lastMove, lastProbe = p, time.Now(), time.Time{}
				continue
			}
			idle := time.Since(lastMove)
			// The first probe after ProbeAfter of silence, then one per StallTimeout.
			if idle < h.cfg.ProbeAfter || (!lastProbe.IsZero() && time.Since(lastProbe) < h.cfg.StallTimeout) {
				continue
			}
			lastProbe = time.Now()
			if !h.probe(ctx, ep) {
				cancel(fmt.Errorf("cove-cache sent nothing for %s and fails its health probe", idle.Round(time.Millisecond)))
				return
			}
			if idle >= h.cfg.SlowOriginTimeout {
				cancel(fmt.Errorf("no body bytes for %s", idle.Round(time.Millisecond)))
				return
			}
		}
	}()
	return func() { close(done) }
}

// copyCounting copies src to w, counting bytes into progress and telling read errors
// (the cache's) from write errors (the client's).
func copyCounting(w io.Writer, src io.Reader, progress *atomic.Int64) (n int64, readErr, writeErr error) {
	buf := make([]byte, 128<<10)
	fl, _ := w.(http.Flusher)
	for {
		m, err := src.Read(buf)
		if m > 0 {
			if _, werr := w.Write(buf[:m]); werr != nil {
				return n, nil, werr
			}
			n += int64(m)
			progress.Store(n)
			if fl != nil {
				fl.Flush()
			}
		}
		if err == io.EOF {
			return n, nil, nil
		}
		if err != nil {
			return n, err, nil
		}
	}
}

// watchBody reads a cove-cache response body under watchStall, for the prefill: when
// the cache stops sending and fails its health probe (or sends nothing for
// SlowOriginTimeout), the request is cancelled, the read fails with the reason and the
// breaker counts the failure. Closing the body stops the watch and ends the request.
func (h *Handler) watchBody(parent, ctx context.Context, ep *cacheEndpoint, body io.ReadCloser, cancel context.CancelCauseFunc, path string) io.ReadCloser {
	b := &watchedBody{body: body, parent: parent, ctx: ctx, cancel: cancel, h: h, ep: ep, path: path}
	b.stop = h.watchStall(ctx, ep, &b.progress, cancel)
	return b
}

type watchedBody struct {
	body        io.ReadCloser
	parent, ctx context.Context
	cancel      context.CancelCauseFunc
	stop        func()
	h           *Handler
	ep          *cacheEndpoint
	path        string
	progress    atomic.Int64
	n           int64
	failed      bool
	closeOnce   sync.Once
}

func (b *watchedBody) Read(p []byte) (int, error) {
	n, err := b.body.Read(p)
	if n > 0 {
		b.n += int64(n)
		b.progress.Store(b.n)
	}
	if err == nil || err == io.EOF || b.parent.Err() != nil {
		return n, err // a clean end, or the reader's own cancellation
	}
	if cause := context.Cause(b.ctx); cause != nil {
		err = cause
	}
	if !b.failed {
		b.failed = true
		b.ep.breaker.Failure()
		b.h.log.Warn("cove-cache broke off a prefill", "cache", b.ep.base, "path", b.path, "received", b.n, "error", err)
	}
	return n, err
}

func (b *watchedBody) Close() error {
	var err error
	b.closeOnce.Do(func() {
		b.stop()
		err = b.body.Close()
		b.cancel(nil)
	})
	return err
}
