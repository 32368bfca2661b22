package mirror

import (
	"context"
	"errors"
	"io"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/route"
)

type result struct {
	resp *http.Response
	err  error
}

// gone is roundTrip's why when the caller's context ended first.
const gone = "gone"

// tryCache sends the request to one cove-cache. done is true when the client has been
// answered (or has gone); otherwise nothing was written and why says what failed.
func (h *Handler) tryCache(w http.ResponseWriter, r *http.Request, req *route.Request, ep *cacheEndpoint) (done bool, why string) {
	u := ep.base + r.URL.EscapedPath()
	if r.URL.RawQuery != "" {
		u += "?" + r.URL.RawQuery
	}
	header := httpx.OriginRequestHeaders(r.Header)
	if rg := r.Header.Get("Range"); rg != "" {
		header.Set("Range", rg)
	}
	resp, ctx, cancel, why := h.roundTrip(r.Context(), ep, r.Method, u, header, r.URL.Path)
	switch why {
	case "":
	case gone:
		return true, ""
	default:
		return false, why
	}
	h.streamFromCache(w, r, req, ep, resp, ctx, cancel)
	return true, ""
}

// roundTrip sends one request to ep and waits for its response headers within the
// bounds every request to cove-cache gets (awaitHeaders), on a context derived from
// parent. On success (why == "") the caller owns resp, whose status is below 500, and
// must call cancel once done with its body. Otherwise why is "request", "headers",
// "slow-origin", "connect" or "status" (the failures the breaker counts are counted),
// or gone when parent ended first.
func (h *Handler) roundTrip(parent context.Context, ep *cacheEndpoint, method, u string, header http.Header, path string) (resp *http.Response, ctx context.Context, cancel context.CancelCauseFunc, why string) {
	ctx, cancel = context.WithCancelCause(parent)
	creq, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		cancel(err)
		return nil, nil, nil, "request"
	}
	creq.Header = header
	var res result
	ready := make(chan struct{})
	go func() {
		res.resp, res.err = ep.client.Do(creq)
		close(ready)
	}()
	if why := h.awaitHeaders(parent, ep, ready, path); why != "" {
		// Abandoned: whatever answer still arrives is closed.
		cancel(errors.New("cove-cache answer abandoned: " + why))
		go func() {
			<-ready
			if res.resp != nil {
				res.resp.Body.Close()
			}
		}()
		return nil, nil, nil, why
	}
	if res.err != nil {
		cancel(res.err)
		if parent.Err() != nil {
			return nil, nil, nil, gone
		}
		ep.breaker.Failure()
		h.log.Warn("cove-cache unreachable: falling back", "cache", ep.base, "error", res.err)
		return nil, nil, nil, "connect"
	}
	resp = res.resp
	if resp.StatusCode >= 500 {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		cancel(nil)
		// 502 is cove-cache saying it could not reach the origin: this node may still
		// can, and the cache itself is fine. Anything else is the cache failing.
		if resp.StatusCode != http.StatusBadGateway {
			ep.breaker.Failure()
		}
		return nil, nil, nil, "status"
	}
	ep.breaker.Success()
	return resp, ctx, cancel, ""
}

// awaitHeaders waits until ready is closed, as long as a request to cove-cache may wait
// for its response headers: the first health probe of ep after ProbeAfter, then one
// every HeaderTimeout. A failed probe ends the wait ("headers", and the breaker counts
// a failure): the cache is dead or hung. A healthy cache is waited on, a cold fill
// behind a slow origin, up to SlowOriginTimeout ("slow-origin"). It returns "" when
// ready closed, gone when ctx ended.
func (h *Handler) awaitHeaders(ctx context.Context, ep *cacheEndpoint, ready <-chan struct{}, path string) (why string) {
	timer := time.NewTimer(h.cfg.ProbeAfter)
	defer timer.Stop()
	slowDeadline := time.Now().Add(h.cfg.SlowOriginTimeout)
	for {
		select {
		case <-ready:
			return ""
		case <-timer.C:
			if !h.probe(ctx, ep) {
				ep.breaker.Failure()
				h.log.Warn("cove-cache sent no headers and fails its health probe: falling back", "cache", ep.base, "path", path)
				return "headers"
			}
			select { // the answer may have come during the probe
			case <-ready:
				return ""
			default:
			}
			if time.Now().After(slowDeadline) {
				h.log.Warn("cove-cache healthy but the origin behind it too slow: falling back", "cache", ep.base, "path", path)
				return "slow-origin"
			}
			timer.Reset(h.cfg.HeaderTimeout)
		case <-ctx.Done():
			return gone
		}
	}
}

func (h *Handler) probe(ctx context.Context, ep *cacheEndpoint) bool {
	pctx, cancel := context.WithTimeout(ctx, h.cfg.ProbeTimeout)
	defer cancel()
	return ep.probe(pctx)
}

// streamFromCache relays cove-cache's answer. A body that stalls on a cache that fails
// its probe, or breaks, is finished from the origin with a Range request.
func (h *Handler) streamFromCache(w http.ResponseWriter, r *http.Request, req *route.Request, ep *cacheEndpoint, resp *http.Response, ctx context.Context, cancel context.CancelCauseFunc) {
	defer cancel(nil)
	defer resp.Body.Close()
	h.around.saw(req, r, resp.StatusCode)
	httpx.CopyRelayed(w.Header(), resp.Header)
	if ns := resp.Header.Get("Oci-Namespace"); ns != "" {
		w.Header().Set("Oci-Namespace", ns)
	}
	if h.cfg.OnManifest != nil && req.Kind == route.KindManifest && r.Method == http.MethodGet &&
		resp.StatusCode == http.StatusOK && resp.ContentLength >= 0 && resp.ContentLength <= maxManifestSize {
		h.serveHeldManifest(w, r, req, ep, resp)
		return
	}
	w.WriteHeader(resp.StatusCode)
	if fl, ok := w.(http.Flusher); ok {
		fl.Flush()
	}
	if r.Method == http.MethodHead {
		h.cfg.Observe("cache", "", false)
		return
	}

	var progress atomic.Int64
	stopWatch := h.watchStall(r.Context(), ep, &progress, cancel)
	sent, readErr, writeErr := copyCounting(w, resp.Body, &progress)
	stopWatch()
	if readErr == nil && writeErr == nil {
		// Counted even when containerd hung up just after the last byte.
		h.cfg.Observe("cache", "", false)
		return
	}
	if writeErr != nil || r.Context().Err() != nil {
		return // containerd left
	}
	cause := context.Cause(ctx)
	if cause == nil {
		cause = readErr
	}
	ep.breaker.Failure()
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusPartialContent || req.Kind != route.KindBlob {
		h.log.Warn("cove-cache broke off a response that cannot be resumed", "cache", ep.base, "path", r.URL.Path, "error", cause)
		panic(http.ErrAbortHandler)
	}
	start, end, ok := resumeRange(resp)
	if !ok {
		h.log.Warn("cove-cache broke off a body of unknown length", "cache", ep.base, "path", r.URL.Path, "error", cause)
		panic(http.ErrAbortHandler)
	}
	h.log.Warn("cove-cache broke off a blob: resuming from the next cache or the origin", "cache", ep.base, "path", r.URL.Path, "sent", sent, "error", cause)
	more, done := h.resumeFromCaches(w, r, req, ep, start+sent, end)
	if done {
		if r.Context().Err() == nil {
			h.cfg.Observe("cache", "", true)
		}
		return
	}
	if err := h.resume(w, r, req, start+sent+more, end); err != nil {
		h.log.Warn("resuming from the origin failed", "path", r.URL.Path, "error", err)
		panic(http.ErrAbortHandler)
	}
	h.cfg.Observe("origin", "stall", true)
}
