package server

import (
	"context"
	"errors"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/authz"
	"github.com/cove-oci/cove/proxy/fill"
	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/route"
	"github.com/cove-oci/cove/proxy/storage"
)

func blobPath(req *route.Request) string {
	return "/v2/" + req.Repository + "/blobs/" + req.Digest.String()
}

func (s *Server) serveBlob(w http.ResponseWriter, r *http.Request, req *route.Request) {
	ctx := r.Context()
	path := blobPath(req)
	if s.refuseUnverifiedJoinOnly(w, r) {
		return
	}
	if size, ok := s.hasBlob(ctx, req.Registry, req.Digest); ok {
		if !s.authorize(w, r, req, path, req.Digest) {
			return
		}
		s.metrics.Request("blob", metrics.ResultHit)
		s.serveStored(w, r, req, size, "application/octet-stream")
		return
	}
	if r.Method == http.MethodHead {
		// A HEAD miss is a question for the origin; no reason to fetch the body.
		resp, err := s.origin.Do(ctx, http.MethodHead, req.Registry, path, nil, r.Header, nil)
		if err != nil {
			s.originUnavailable(w, req, "blob", err)
			return
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			s.learn(r, req, req.Digest)
		}
		s.metrics.Request("blob", metrics.ResultPassthrough)
		relay(w, r, resp.StatusCode, resp.Header, nil)
		return
	}
	if s.serveJoinOnly(w, r, req, path) || s.joinOwnFill(w, r, req, path) {
		return // a replica taking over from this one, or a fill in flight here (peer_handover.go)
	}
	if s.forwardMiss(w, r, req, path) || s.joinPeerFill(w, r, req, path) {
		return // its owner, another replica, serves it (peer.go)
	}
	s.serveFromFill(w, r, req, path)
}

// authorize asks the one decision (authz.MayRead) whether this client may be served this
// cached object of this repository, and answers the client itself when not: the origin's
// own refusal relayed (a 401 challenge included), or 502 when the origin could not be
// asked and the offline policy does not serve. A stale yes is marked on the response.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request, req *route.Request, path string, d digest.Digest) bool {
	obj := authz.Object{Registry: req.Registry, Repository: req.Repository, Digest: d}
	dec := s.authz.MayRead(r.Context(), authz.CredentialOf(r.Header), obj, s.askOrigin(r.Header, req.Registry, path))
	if dec.Asked {
		s.metrics.AuthzCheck()
	}
	switch dec.Verdict {
	case authz.Allow:
		return true
	case authz.AllowStale:
		s.markStale(w, req)
		return true
	case authz.Unavailable:
		// Never serve a cached byte the origin has not allowed; containerd falls back.
		s.originUnavailable(w, req, req.Kind.String(), dec.Err)
		return false
	}
	s.metrics.Request(req.Kind.String(), metrics.ResultForStatus(dec.Status))
	relay(w, r, dec.Status, dec.Header, nil)
	return false
}

// askOrigin is the origin check of a decision: a HEAD of path with the client's own
// credentials.
func (s *Server) askOrigin(header http.Header, registry, path string) authz.AskOrigin {
	return func(ctx context.Context) authz.OriginAnswer {
		resp, err := s.origin.Do(ctx, http.MethodHead, registry, path, nil, header, nil)
		if err != nil {
			return authz.OriginAnswer{Err: err}
		}
		resp.Body.Close()
		return authz.OriginAnswer{Status: resp.StatusCode, Header: resp.Header}
	}
}

// learn records the origin's 200 to this client for digest d in the request's repository.
func (s *Server) learn(r *http.Request, req *route.Request, d digest.Digest) {
	s.authz.Learn(r.Context(), authz.CredentialOf(r.Header), authz.Object{Registry: req.Registry, Repository: req.Repository, Digest: d})
}

// fillOwner identifies (credential, registry, repository): a client with the same owner
// as a fill was authorized by the origin's answer to that fill.
func fillOwner(r *http.Request, req *route.Request) string {
	return string(authz.CredentialOf(r.Header)) + "|" + req.Registry + "|" + req.Repository
}

// markStale labels a response served while the origin could not be asked.
func (s *Server) markStale(w http.ResponseWriter, req *route.Request) {
	w.Header().Set("Warning", `110 cove-cache "Response is Stale: origin unreachable, served by the offline policy"`)
	s.metrics.Request(req.Kind.String(), metrics.ResultStale)
	s.log.Warn("origin unreachable: serving by the offline policy", "registry", req.Registry, "repository", req.Repository, "kind", req.Kind.String())
}

// serveStored serves a verified blob from storage, whole or one range of it.
func (s *Server) serveStored(w http.ResponseWriter, r *http.Request, req *route.Request, size int64, contentType string) {
	d := req.Digest
	if d == "" {
		return
	}
	s.serveStoredDigest(w, r, req.Registry, d, size, contentType)
}

func (s *Server) serveStoredDigest(w http.ResponseWriter, r *http.Request, registry string, d digest.Digest, size int64, contentType string) {
	rng, partial, ok := s.parseRange(w, r, size)
	if !ok {
		return
	}
	blob, err := s.store.Open(r.Context(), d)
	if err != nil {
		s.log.Error("opening stored blob failed", "digest", d, "error", err)
		httpx.WriteError(w, http.StatusInternalServerError, "UNKNOWN", "cached blob unreadable")
		return
	}
	defer blob.Close()
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Etag", `"`+d.String()+`"`)
	h.Set("Accept-Ranges", "bytes")
	h.Set("Content-Length", strconv.FormatInt(rng.Length(), 10))
	status := http.StatusOK
	if partial {
		h.Set("Content-Range", rng.ContentRange(size))
		status = http.StatusPartialContent
	}
	w.WriteHeader(status)
	if r.Method == http.MethodHead || rng.Length() == 0 {
		return
	}
	var src io.Reader = io.NewSectionReader(blob, rng.Start, rng.Length())
	// A plain file lets net/http use sendfile(2): the bytes never pass through user space.
	if fb, ok := blob.(interface{ OSFile() *os.File }); ok {
		if f := fb.OSFile(); f != nil {
			if _, err := f.Seek(rng.Start, io.SeekStart); err == nil {
				src = io.LimitReader(f, rng.Length())
			}
		}
	}
	n, err := io.Copy(w, src)
	s.metrics.Sent(registry, "cache", n)
	if err != nil || n != rng.Length() {
		panic(http.ErrAbortHandler)
	}
}

// parseRange resolves the Range header against a known size. It answers malformed and
// unsatisfiable ranges itself and then returns ok=false.
func (s *Server) parseRange(w http.ResponseWriter, r *http.Request, size int64) (httpx.ByteRange, bool, bool) {
	rng, partial, err := httpx.ParseRange(r.Header.Get("Range"), size)
	switch {
	case errors.Is(err, httpx.ErrRangeMultiple):
		partial, err = false, nil
	case errors.Is(err, httpx.ErrRangeUnsatisfiable):
		w.Header().Set("Content-Range", "bytes */"+strconv.FormatInt(size, 10))
		httpx.WriteError(w, http.StatusRequestedRangeNotSatisfiable, "RANGE_INVALID", "range not satisfiable")
		return rng, false, false
	case err != nil:
		httpx.WriteError(w, http.StatusBadRequest, "RANGE_INVALID", err.Error())
		return rng, false, false
	}
	if !partial {
		rng = httpx.ByteRange{Start: 0, End: size - 1}
	}
	return rng, partial, true
}

// serveFromFill serves a blob the cache does not have: it starts the one origin fetch for
// it, or joins the one running, and streams while the bytes arrive.
func (s *Server) serveFromFill(w http.ResponseWriter, r *http.Request, req *route.Request, path string) {
	originHeader := httpx.OriginRequestHeaders(r.Header) // the fill may outlive this request
	registry := req.Registry
	fetch := func(ctx context.Context, from, to int64) (*http.Response, error) {
		// A range: the fill resumes a body cut short, or fetches one of its parallel
		// segments, with this client's credentials.
		return s.origin.Do(ctx, http.MethodGet, registry, path, nil, originHeader, fill.RangeHeader(from, to))
	}
	s.serveFromFillVia(w, r, req, path, s.fills, fetch)
}

// serveFromFillVia is serveFromFill with the fills of fills, started with fetch: the
// origin's, or a peer's (peer.go).
func (s *Server) serveFromFillVia(w http.ResponseWriter, r *http.Request, req *route.Request, path string, fills *fill.Manager, fetch fill.FetchFunc) {
	ctx := r.Context()
	own := fillOwner(r, req)
	key := fill.Key{Registry: req.Registry, Digest: req.Digest}
	from := rangeStart(r.Header.Get("Range"))
	// A fill another client started that ends without content (that client's credentials
	// were refused) is no answer for this one: it gets one fill of its own.
	for attempt := 0; attempt < 2; attempt++ {
		f, started := fills.JoinAt(key, own, from, fetch)
		if f == nil {
			// A fill stored the blob between this request's look at the store and now.
			if size, ok := s.hasBlob(ctx, req.Registry, req.Digest); ok {
				if s.authorize(w, r, req, path, req.Digest) {
					s.metrics.Request("blob", metrics.ResultHit)
					s.serveStored(w, r, req, size, "application/octet-stream")
				}
				return
			}
			fills.ForgetStored(key) // evicted since: fetch it again
			if f, started = fills.JoinAt(key, own, from, fetch); f == nil {
				s.metrics.Request("blob", metrics.ResultError)
				httpx.WriteError(w, http.StatusBadGateway, "UNAVAILABLE", "blob stored and gone again: retry")
				return
			}
		}
		if s.serveJoined(w, r, req, path, f, started) {
			return
		}
	}
	s.metrics.Request("blob", metrics.ResultError)
	httpx.WriteError(w, http.StatusBadGateway, "UNAVAILABLE", "origin fetch failed")
}

// serveJoined serves a client from the fill f it joined (started: its own request
// started f) and releases f. It reports false, having written nothing, when f ended
// without content and another client started it (that client's credentials were
// refused): this client's answer is still to be asked for.
func (s *Server) serveJoined(w http.ResponseWriter, r *http.Request, req *route.Request, path string, f *fill.Fill, started bool) bool {
	ctx := r.Context()
	defer f.Release()
	if !started && f.Owner != fillOwner(r, req) {
		// Joining streams bytes fetched with someone else's credentials: the origin
		// must first say this client may read this blob in this repository.
		if !s.authorize(w, r, req, path, req.Digest) {
			return true
		}
	}
	resp, err := f.Response(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.originUnavailable(w, req, "blob", err)
		}
		return true
	}
	if resp.Status != http.StatusOK {
		if !started {
			return false
		}
		s.metrics.Request("blob", metrics.ResultForStatus(resp.Status))
		relay(w, r, resp.Status, resp.Header, bytesReader(resp.Body))
		return true
	}
	result := metrics.ResultMiss
	if !started {
		result = metrics.ResultCoalesced
	} else {
		// The origin just answered this credential 200 for this blob in this repository.
		s.learn(r, req, req.Digest)
	}
	s.metrics.Request("blob", result)
	s.streamFill(w, r, req, f)
	return true
}

// streamFill sends the client its range of a running fill: headers at once, bytes as they
// arrive. A fill that fails aborts the response, so the client sees a broken transfer
// (and falls back or resumes), never a clean end.
func (s *Server) streamFill(w http.ResponseWriter, r *http.Request, req *route.Request, f *fill.Fill) {
	ctx := r.Context()
	size := f.Size()
	if size < 0 && r.Header.Get("Range") != "" {
		// The origin sent no length: a range can only be resolved once the body is whole.
		var err error
		if size, err = f.WaitSize(ctx); err != nil {
			if ctx.Err() == nil {
				s.originUnavailable(w, req, "blob", err)
			}
			return
		}
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Docker-Content-Digest", req.Digest.String())
	h.Set("Etag", `"`+req.Digest.String()+`"`)
	start, length := int64(0), int64(-1)
	status := http.StatusOK
	if size >= 0 {
		h.Set("Accept-Ranges", "bytes")
		rng, partial, ok := s.parseRange(w, r, size)
		if !ok {
			return
		}
		start, length = rng.Start, rng.Length()
		h.Set("Content-Length", strconv.FormatInt(length, 10))
		if partial {
			h.Set("Content-Range", rng.ContentRange(size))
			status = http.StatusPartialContent
		}
	}
	w.WriteHeader(status)
	if fl, ok := w.(http.Flusher); ok {
		fl.Flush() // headers now: containerd gives up after 30 s without them
	}
	if length == 0 {
		return
	}
	rd := f.NewReader(ctx, start, length)
	if status == http.StatusPartialContent && boundedRange(r.Header.Get("Range")) {
		// A range with an end (a lazy puller's): served as its bytes arrive, fetched at
		// once when far ahead of the fill (see fill.NewRangeReader).
		rd = f.NewRangeReader(ctx, start, length)
	}
	n, err := io.Copy(w, rd)
	s.metrics.Sent(req.Registry, "fill", n)
	if err != nil {
		if errors.Is(err, fill.ErrCredentialWait) {
			s.log.Info("fill's credentials expired: client cut off to resume with a fresh one", "registry", req.Registry, "digest", req.Digest, "sent", n)
		} else if errors.Is(err, fill.ErrBehind) {
			s.log.Debug("client fell behind a pass-through fill: cut off to resume", "registry", req.Registry, "digest", req.Digest, "sent", n)
		} else if errors.Is(err, fill.ErrFailed) {
			s.log.Warn("fill failed while streaming to a client", "registry", req.Registry, "digest", req.Digest, "sent", n, "error", err)
		} else {
			// The client left: containerd's ranged fetches close each range early.
			s.log.Debug("client stopped reading a fill", "registry", req.Registry, "digest", req.Digest, "sent", n, "error", err)
		}
		panic(http.ErrAbortHandler)
	}
}

// boundedRange reports whether a Range header asks for a range with an end ("bytes=a-b"
// or a suffix "bytes=-n"), not the rest of a body from a byte on ("bytes=a-", a resumed
// download, which gets the last byte only once the whole blob is verified).
func boundedRange(header string) bool {
	return !strings.HasSuffix(strings.TrimSpace(header), "-")
}

// rangeStart is the first byte a Range header asks for: 0 for none, a suffix range or
// one that does not parse (the fill then serves whoever reads from the start).
func rangeStart(header string) int64 {
	rng, partial, err := httpx.ParseRange(header, -1)
	if err != nil || !partial {
		return 0
	}
	return rng.Start
}

// commitFill stores a verified fill, then records where it came from. The provenance
// record goes last: it is what makes the blob servable for that registry.
func (s *Server) commitFill(ctx context.Context, f *fill.Fill, spoolPath string) error {
	size := f.Size()
	var err error
	if ad, ok := s.store.(storage.HeldAdopter); ok {
		// Held until the fill's clients have read the spool: not evicted under them.
		var release func()
		if release, err = ad.AdoptFileHeld(ctx, f.Key.Digest, size, spoolPath); err == nil {
			f.OnClose(release)
		}
	} else if ad, ok := s.store.(storage.FileAdopter); ok {
		err = ad.AdoptFile(ctx, f.Key.Digest, size, spoolPath)
	} else {
		var file *os.File
		if file, err = os.Open(spoolPath); err == nil {
			err = s.store.Put(ctx, f.Key.Digest, size, file)
			file.Close()
		}
	}
	if err != nil {
		return err
	}
	return s.recordProvenance(ctx, f.Key.Registry, f.Key.Digest)
}

func (s *Server) fillDone(f *fill.Fill, err error) {
	result := "ok"
	if err != nil {
		result = "failed"
		if errors.Is(err, fill.ErrRefused) {
			result = "refused"
		}
	}
	s.metrics.Fill(result, f.Elapsed())
}
