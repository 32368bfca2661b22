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

// serveFill streams a whole blob from a running prefill. It returns false, having
// written nothing, when the prefill ended without content.
func (h *Handler) serveFill(w http.ResponseWriter, r *http.Request, f *fill.Fill) bool {
	if r.Header.Get("Range") != "" {
		return false // ranged fetches go the usual way
	}
	resp, err := f.Response(r.Context())
	if err != nil || resp.Status != http.StatusOK {
		return false
	}
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
	if _, err := io.Copy(w, f.NewReader(r.Context(), 0, -1)); err != nil {
		panic(http.ErrAbortHandler) // containerd retries the blob and finds it, or fetches it
	}
	return true
}

// FetchFromCache GETs a blob from the first cove-cache whose breaker allows it, with the
// client's headers, for the prefill. It never falls back to the origin: a prefill is an
// optimisation, and containerd fetches whatever the prefill could not.
func (h *Handler) FetchFromCache(ctx context.Context, registry, repository string, d digest.Digest, header http.Header) (*http.Response, error) {
	for _, ep := range h.caches {
		if !ep.breaker.Allow() {
			continue
		}
		u := ep.base + "/v2/" + repository + "/blobs/" + d.String() + "?ns=" + url.QueryEscape(registry)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return nil, err
		}
		req.Header = httpx.OriginRequestHeaders(header)
		return ep.client.Do(req)
	}
	return nil, errors.New("no healthy cove-cache")
}
