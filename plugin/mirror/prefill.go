package mirror

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/fill"
	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/route"
)

// serveHeldManifest sends the headers at once (containerd gives up after 30 s without
// them), reads the manifest whole, lets OnManifest start the prefill, holds the body
// while it runs, then sends the body.
func (h *Handler) serveHeldManifest(w http.ResponseWriter, r *http.Request, req *route.Request, ep *cacheEndpoint, resp *http.Response) {
	w.WriteHeader(resp.StatusCode)
	if fl, ok := w.(http.Flusher); ok {
		fl.Flush()
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	if err == nil && int64(len(body)) != resp.ContentLength {
		err = fmt.Errorf("manifest body of %d bytes, want %d", len(body), resp.ContentLength)
	}
	d := req.Digest
	if d == "" {
		d, _ = digest.Parse(resp.Header.Get("Docker-Content-Digest"))
	}
	if err == nil && d != "" && d.Validate() == nil && d.Algorithm().FromBytes(body) != d {
		err = fmt.Errorf("manifest body does not match %s", d)
	}
	if err != nil {
		ep.breaker.Failure()
		h.log.Warn("cove-cache sent a broken manifest", "cache", ep.base, "path", r.URL.Path, "error", err)
		panic(http.ErrAbortHandler) // containerd retries, and the breaker sends it to the origin
	}
	if hold := h.cfg.OnManifest(r.Context(), Manifest{
		Registry: req.Registry, Repository: req.Repository, Digest: d,
		MediaType: resp.Header.Get("Content-Type"), Body: body, Header: r.Header,
	}); hold != nil {
		hold(r.Context())
	}
	if _, err := w.Write(body); err != nil {
		return
	}
	h.cfg.Observe("cache", "", false)
}

// serveFill answers containerd's GET of a blob from f, the running prefill of that
// blob, so no byte is fetched twice. The prefill fetches from cove-cache within the
// bounds of the resolver hook's own requests (FetchFromCache), and containerd's request
// waits on it no longer than tryCache would wait on its own: for the prefill's response
// headers, awaitHeaders probing the first cache the breakers allow; for the body, the
// prefill's own stall watch, and a blob the prefill loses mid-body is finished from the
// origin with a Range request, as streamFromCache finishes a broken cache body.
//
// done is true when the client has been answered (or has gone). Otherwise nothing was
// written, and why is "" when the prefill ended without content (the request goes the
// usual way) or the reason the wait ended, where tryCache would have fallen back too.
func (h *Handler) serveFill(w http.ResponseWriter, r *http.Request, req *route.Request, f *fill.Fill) (done bool, why string) {
	wctx, stop := context.WithCancel(r.Context())
	defer stop()
	var resp *fill.Response
	var err error
	ready := make(chan struct{})
	go func() {
		resp, err = f.Response(wctx)
		close(ready)
	}()
	var ep *cacheEndpoint
	for _, e := range h.cachesFor(req) {
		if e.breaker.Allow() {
			ep = e
			break
		}
	}
	if ep == nil {
		// Every cache is bypassed: take the prefill's answer if it is there, wait for
		// nothing.
		select {
		case <-ready:
		default:
			return false, ""
		}
	} else if why := h.awaitHeaders(r.Context(), ep, ready, r.URL.Path); why != "" {
		return why == gone, why
	}
	if err != nil || resp.Status != http.StatusOK {
		return false, ""
	}
	h.around.saw(req, r, http.StatusOK)
	size := f.Size()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Docker-Content-Digest", f.Key.Digest.String())
	if size >= 0 {
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	}
	w.WriteHeader(http.StatusOK)
	if fl, ok := w.(http.Flusher); ok {
		fl.Flush()
	}
	cw := &countingWriter{w: w}
	_, err = io.Copy(cw, f.NewReader(r.Context(), 0, -1))
	if err == nil {
		h.cfg.Observe("prefill", "", false)
		return true, ""
	}
	if r.Context().Err() != nil {
		return true, "" // containerd left
	}
	if _, ferr := f.Done(); ferr == nil || size < 0 {
		h.log.Warn("sending a prefilled blob failed", "path", r.URL.Path, "sent", cw.n, "error", err)
		panic(http.ErrAbortHandler) // containerd retries the blob and finds it, or fetches it
	}
	h.log.Warn("the prefill of a blob broke off: resuming from the origin", "path", r.URL.Path, "sent", cw.n, "error", err)
	if err := h.resume(w, r, req, cw.n, size-1); err != nil {
		h.log.Warn("resuming from the origin failed", "path", r.URL.Path, "error", err)
		panic(http.ErrAbortHandler)
	}
	h.cfg.Observe("origin", "stall", true)
	return true, ""
}

// countingWriter counts the bytes w accepted. It passes ReadFrom on, so a prefilled
// blob still goes out with sendfile(2) from its spool file.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

func (c *countingWriter) ReadFrom(src io.Reader) (int64, error) {
	rf, ok := c.w.(io.ReaderFrom)
	if !ok {
		return io.Copy(struct{ io.Writer }{c}, src)
	}
	n, err := rf.ReadFrom(src)
	c.n += n
	return n, err
}

// FetchFromCache GETs a blob from cove-cache for the prefill, with the client's
// headers, bounded like the resolver hook's own requests: the connect, the response
// headers (awaitHeaders) and every stall of the body (watchStall), each judged by a
// health probe; a failing cache is counted by its breaker and the next one is tried.
// It never falls back to the origin: a prefill is an optimisation, and containerd
// fetches whatever the prefill could not. The caller must close the body.
func (h *Handler) FetchFromCache(ctx context.Context, registry, repository string, d digest.Digest, header http.Header) (*http.Response, error) {
	failure := "no healthy cove-cache"
	for _, ep := range h.cachesForKey(d.String()) {
		if !ep.breaker.Allow() {
			continue
		}
		path := "/v2/" + repository + "/blobs/" + d.String()
		u := ep.base + path + "?ns=" + url.QueryEscape(registry)
		hdr := httpx.OriginRequestHeaders(header)
		if v := header.Get("Range"); v != "" {
			hdr.Set("Range", v) // a prefill fill resuming a body cut short
		}
		resp, rctx, cancel, why := h.roundTrip(ctx, ep, http.MethodGet, u, hdr, path)
		switch why {
		case "":
			resp.Body = h.watchBody(ctx, rctx, ep, resp.Body, cancel, path)
			return resp, nil
		case gone:
			return nil, context.Cause(ctx)
		}
		failure = "cove-cache " + ep.base + ": " + why
	}
	return nil, errors.New(failure)
}
