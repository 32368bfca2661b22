package mirror

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync/atomic"

	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/route"
)

// resumeRange is the byte range the cache's answer covers: [start, end] inclusive.
func resumeRange(resp *http.Response) (start, end int64, ok bool) {
	if resp.StatusCode == http.StatusPartialContent {
		var size int64
		if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-%d/%d", &start, &end, &size); err != nil {
			return 0, 0, false
		}
		return start, end, true
	}
	if resp.ContentLength < 0 {
		return 0, 0, false
	}
	return 0, resp.ContentLength - 1, true
}

// resume sends bytes [from, end] of the blob from the origin, after the part the cache
// already sent. An origin that ignores Range is read from the start and the bytes
// already sent are skipped.
func (h *Handler) resume(w http.ResponseWriter, r *http.Request, req *route.Request, from, end int64) error {
	if from > end {
		return nil // the cache sent everything but the clean end
	}
	extra := http.Header{"Range": {"bytes=" + strconv.FormatInt(from, 10) + "-" + strconv.FormatInt(end, 10)}}
	resp, err := h.origin.Do(r.Context(), http.MethodGet, req.Registry, originPath(req), nil, r.Header, extra)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var body io.Reader = resp.Body
	switch resp.StatusCode {
	case http.StatusPartialContent:
		var s, e, size int64
		if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-%d/%d", &s, &e, &size); err != nil || s != from {
			return fmt.Errorf("origin answered range %q for bytes=%d-", resp.Header.Get("Content-Range"), from)
		}
	case http.StatusOK:
		if _, err := io.CopyN(io.Discard, resp.Body, from); err != nil {
			return fmt.Errorf("skipping to offset %d: %w", from, err)
		}
	default:
		return fmt.Errorf("origin answered %d to the resume", resp.StatusCode)
	}
	want := end - from + 1
	n, err := io.Copy(w, io.LimitReader(body, want))
	if err != nil {
		return err
	}
	if n != want {
		return fmt.Errorf("origin sent %d of %d bytes", n, want)
	}
	return nil
}

// serveOrigin answers from the origin directly.
func (h *Handler) serveOrigin(w http.ResponseWriter, r *http.Request, req *route.Request, reason string) {
	if req.Registry == "" {
		httpx.WriteError(w, http.StatusBadGateway, "UNAVAILABLE", "no registry named")
		return
	}
	var extra http.Header
	if rg := r.Header.Get("Range"); rg != "" {
		extra = http.Header{"Range": {rg}}
	}
	resp, err := h.origin.Do(r.Context(), r.Method, req.Registry, originPath(req), req.Query, r.Header, extra)
	if err != nil {
		h.log.Warn("origin unreachable", "registry", req.Registry, "error", err)
		httpx.WriteError(w, http.StatusBadGateway, "UNAVAILABLE", "origin registry "+req.Registry+" could not be reached")
		return
	}
	defer resp.Body.Close()
	httpx.CopyRelayed(w.Header(), resp.Header)
	w.WriteHeader(resp.StatusCode)
	if r.Method == http.MethodHead {
		h.cfg.Observe("origin", reason, false)
		return
	}
	if _, err := io.Copy(w, resp.Body); err != nil {
		panic(http.ErrAbortHandler)
	}
	h.cfg.Observe("origin", reason, false)
}

// resumeFromCaches sends bytes [from, end] of a blob the cache broken broke off, from the
// next caches in the blob's rank (a replica that died mid-body: the next in rank takes
// its blobs over, fills once for every node, and stores it), each within the bounds of
// any request to a cache (roundTrip, watchStall). It returns how many bytes it sent and
// whether the client is answered (or gone); otherwise the caller finishes from the origin
// at from+sent.
func (h *Handler) resumeFromCaches(w http.ResponseWriter, r *http.Request, req *route.Request, broken *cacheEndpoint, from, end int64) (sent int64, done bool) {
	u := r.URL.EscapedPath()
	if r.URL.RawQuery != "" {
		u += "?" + r.URL.RawQuery
	}
	for _, ep := range h.cachesFor(req) {
		if ep == broken || !ep.breaker.Allow() {
			continue
		}
		header := httpx.OriginRequestHeaders(r.Header)
		header.Set("Range", "bytes="+strconv.FormatInt(from, 10)+"-"+strconv.FormatInt(end, 10))
		resp, ctx, cancel, why := h.roundTrip(r.Context(), ep, http.MethodGet, ep.base+u, header, r.URL.Path)
		switch why {
		case "":
		case gone:
			return sent, true
		default:
			continue
		}
		var s, e, size int64
		if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-%d/%d", &s, &e, &size); resp.StatusCode != http.StatusPartialContent || err != nil || s != from || e != end {
			h.log.Warn("cove-cache answered a resume with another range", "cache", ep.base, "path", r.URL.Path, "status", resp.StatusCode, "content_range", resp.Header.Get("Content-Range"))
			resp.Body.Close()
			cancel(nil)
			continue
		}
		var progress atomic.Int64
		stop := h.watchStall(r.Context(), ep, &progress, cancel)
		n, readErr, writeErr := copyCounting(w, io.LimitReader(resp.Body, end-from+1), &progress)
		stop()
		resp.Body.Close()
		cause := context.Cause(ctx)
		cancel(nil)
		sent, from = sent+n, from+n
		if writeErr != nil || r.Context().Err() != nil {
			return sent, true // containerd left
		}
		if readErr == nil && from > end {
			h.log.Info("finished a blob from the next cove-cache", "cache", ep.base, "path", r.URL.Path, "bytes", n)
			return sent, true
		}
		if cause == nil {
			cause = readErr
		}
		ep.breaker.Failure()
		h.log.Warn("cove-cache broke off a resumed blob", "cache", ep.base, "path", r.URL.Path, "error", cause)
	}
	return sent, false
}
