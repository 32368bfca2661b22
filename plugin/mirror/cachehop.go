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

// tryCache sends the request to one cove-cache. done is true when the client has been
// answered (or has gone); otherwise nothing was written and why says what failed.
func (h *Handler) tryCache(w http.ResponseWriter, r *http.Request, req *route.Request, ep *cacheEndpoint) (done bool, why string) {
	ctx, cancel := context.WithCancelCause(r.Context())
	u := ep.base + r.URL.EscapedPath()
	if r.URL.RawQuery != "" {
		u += "?" + r.URL.RawQuery
	}
	creq, err := http.NewRequestWithContext(ctx, r.Method, u, nil)
	if err != nil {
		cancel(err)
		return false, "request"
	}
	creq.Header = httpx.OriginRequestHeaders(r.Header)
	if rg := r.Header.Get("Range"); rg != "" {
		creq.Header.Set("Range", rg)
	}
	resCh := make(chan result, 1)
	go func() {
		resp, err := ep.client.Do(creq)
		resCh <- result{resp, err}
	}()
	// The request may be abandoned below; whatever answer still arrives is closed.
	abandon := func(cause error) {
		cancel(cause)
		go func() {
			if res := <-resCh; res.resp != nil {
				res.resp.Body.Close()
			}
		}()
	}

	timer := time.NewTimer(h.cfg.ProbeAfter)
	defer timer.Stop()
	slowDeadline := time.Now().Add(h.cfg.SlowOriginTimeout)
	var res result
wait:
	for {
		select {
		case res = <-resCh:
			break wait
		case <-timer.C:
			if !h.probe(r.Context(), ep) {
				abandon(errors.New("cove-cache hung"))
				ep.breaker.Failure()
				h.log.Warn("cove-cache sent no headers and fails its health probe: falling back", "cache", ep.base, "path", r.URL.Path)
				return false, "headers"
			}
			select { // the answer may have come during the probe
			case res = <-resCh:
				break wait
			default:
			}
			if time.Now().After(slowDeadline) {
				abandon(errors.New("origin too slow"))
				h.log.Warn("cove-cache healthy but the origin behind it too slow: falling back", "cache", ep.base, "path", r.URL.Path)
				return false, "slow-origin"
			}
			timer.Reset(h.cfg.HeaderTimeout)
		case <-r.Context().Done():
			abandon(r.Context().Err())
			return true, ""
		}
	}
	if res.err != nil {
		cancel(res.err)
		if r.Context().Err() != nil {
			return true, ""
		}
		ep.breaker.Failure()
		h.log.Warn("cove-cache unreachable: falling back", "cache", ep.base, "error", res.err)
		return false, "connect"
	}
	resp := res.resp
	if resp.StatusCode >= 500 {
		io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		cancel(nil)
		// 502 is cove-cache saying it could not reach the origin: this node may still
		// can, and the cache itself is fine. Anything else is the cache failing.
		if resp.StatusCode != http.StatusBadGateway {
			ep.breaker.Failure()
		}
		return false, "status"
	}
	ep.breaker.Success()
	h.streamFromCache(w, r, req, ep, resp, ctx, cancel)
	return true, ""
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
	if writeErr != nil || r.Context().Err() != nil {
		return // containerd left
	}
	if readErr == nil {
		h.cfg.Observe("cache", "", false)
		return
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
	h.log.Warn("cove-cache broke off a blob: resuming from the origin", "cache", ep.base, "path", r.URL.Path, "sent", sent, "error", cause)
	if err := h.resume(w, r, req, start+sent, end); err != nil {
		h.log.Warn("resuming from the origin failed", "path", r.URL.Path, "error", err)
		panic(http.ErrAbortHandler)
	}
	h.cfg.Observe("origin", "stall", true)
}
