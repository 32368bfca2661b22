package server

import (
	"io"
	"net/http"

	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/origin"
	"github.com/cove-oci/cove/proxy/route"
	"github.com/cove-oci/cove/proxy/token"
)

// relay writes an origin answer back to the client: status and allow-listed headers, and
// body (nil: none). A GET answered with an error status but no body gets a distribution
// error document, so clients always see a well-formed error.
func relay(w http.ResponseWriter, r *http.Request, status int, header http.Header, body io.Reader) {
	httpx.CopyRelayed(w.Header(), header)
	if status == http.StatusUnauthorized {
		token.RewriteChallenge(r, w.Header())
	}
	if r.Method == http.MethodHead {
		w.WriteHeader(status)
		return
	}
	if body == nil {
		if status >= 400 {
			code, msg := httpx.ErrorCode(status, r.URL.Path), "origin registry answered "+http.StatusText(status)
			if refused := header.Get(origin.RefusedHeader); refused != "" {
				code, msg = "DENIED", refused // the origin policy, not the origin, said no
			}
			httpx.WriteError(w, status, code, msg)
			return
		}
		w.Header().Del("Content-Length")
		w.WriteHeader(status)
		return
	}
	w.WriteHeader(status)
	if _, err := io.Copy(w, body); err != nil {
		// A half-relayed body must look broken to the client, not complete.
		panic(http.ErrAbortHandler)
	}
}

// originUnavailable answers when the origin could not be asked. containerd moves on to
// the next host (the origin itself) on any 5xx.
func (s *Server) originUnavailable(w http.ResponseWriter, req *route.Request, op string, err error) {
	s.log.Warn("origin unreachable", "registry", req.Registry, "repository", req.Repository, "operation", op, "error", err)
	s.metrics.Request(op, metrics.ResultError)
	httpx.WriteError(w, http.StatusBadGateway, "UNAVAILABLE", "origin registry "+req.Registry+" could not be reached")
}

// servePing answers /v2/. With ns= it relays the origin's own answer, so a client learns
// the origin's authentication challenge; without, the client will name the registry in
// its paths, and cove-cache answers with its own challenge: it is that client's token
// service (see token.go).
func (s *Server) servePing(w http.ResponseWriter, r *http.Request, req *route.Request) {
	if req.Registry == "" {
		s.metrics.Request("ping", metrics.ResultHit)
		relay(w, r, http.StatusUnauthorized, http.Header{}, nil)
		return
	}
	s.servePassthrough(w, r, req)
}

// servePassthrough relays tags lists and pings: small, changing answers that are not
// cached. (Referrers are cached and authorized: referrers.go.)
func (s *Server) servePassthrough(w http.ResponseWriter, r *http.Request, req *route.Request) {
	var path string
	switch req.Kind {
	case route.KindPing:
		path = "/v2/"
	case route.KindTags:
		path = "/v2/" + req.Repository + "/tags/list"
	}
	resp, err := s.origin.Do(r.Context(), r.Method, req.Registry, path, req.Query, r.Header, nil)
	if err != nil {
		s.originUnavailable(w, req, req.Kind.String(), err)
		return
	}
	defer resp.Body.Close()
	s.metrics.Request(req.Kind.String(), metrics.ResultPassthrough)
	var body io.Reader = resp.Body
	if r.Method == http.MethodHead {
		body = nil
	}
	relay(w, r, resp.StatusCode, resp.Header, body)
}
