package mirror

import (
	"fmt"
	"io"
	"net/http"
	"strconv"

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
