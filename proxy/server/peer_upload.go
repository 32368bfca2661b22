package server

import (
	"errors"
	"io"
	"net/http"
	"net/url"

	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/route"
)

// Upload sessions across replicas. A session (the origin's Location, the spool of the
// bytes forwarded so far) lives in the memory and disk of the replica that opened it,
// while a Service sends each of a client's connections to any replica. So a handle
// starts with the cluster.MemberID of the replica holding its session (uploads.go), and
// a replica that does not hold a handle's session forwards the request to the member
// the handle names, over the peer path: signed by this replica, with the client's own
// method, URI (its routing: ns= or path prefix), credential and body, streamed.
//
// The holder serves it as it serves a client: it looks the session up for the request's
// registry and repository and sends it to the origin with the client's credential. A
// forwarded request is never forwarded again, so a forged handle that names a replica
// gets that replica's 404 BLOB_UPLOAD_UNKNOWN, and a handle naming no current member
// gets this replica's. The peer path adds no way around authorization: the signature
// only says "a replica sent this"; the session's checks and the origin's answer to the
// client's credential decide.

// uploadForwardHeaders are the client's request headers an upload request needs at the
// holder: the credential and what pushHeaders sends to the origin. Content-Length goes
// with the body.
var uploadForwardHeaders = []string{"Authorization", "Content-Type", "Content-Range", "Accept"}

// uploadPeerClient is the client of forwarded upload requests: the peer transport
// without its wait for an answer's headers, which for a blob fetch routes around a
// frozen owner but would cut an upload whose origin takes its time to take a large
// chunk or complete a blob (the client's own timeouts apply, as without replicas).
func uploadPeerClient(transport http.RoundTripper) *http.Client {
	if t, ok := transport.(*http.Transport); ok {
		t = t.Clone()
		t.ResponseHeaderTimeout = 0
		transport = t
	}
	return &http.Client{
		Transport:     transport,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// forwardUpload sends a request naming an upload session that this replica does not
// hold to the replica that does, and relays its answer; it reports whether it did.
func (s *Server) forwardUpload(w http.ResponseWriter, r *http.Request, req *route.Request) bool {
	p := s.peers
	if p == nil || fromPeer(r) || len(req.Upload) <= cluster.MemberIDLen {
		return false
	}
	holder, ok := p.ring.MemberByID(req.Upload[:cluster.MemberIDLen])
	if !ok || holder == p.self {
		return false
	}
	body, length := bodyOf(r)
	out, err := http.NewRequestWithContext(r.Context(), r.Method, holder+r.URL.RequestURI(), body)
	if err != nil {
		return false
	}
	out.ContentLength = length
	for _, k := range uploadForwardHeaders {
		if v := r.Header.Values(k); len(v) > 0 {
			out.Header[k] = v
		}
	}
	out.Header.Set("Accept-Encoding", "identity")
	out.Header.Set("User-Agent", "cove-cache-peer")
	p.auth.Sign(out, p.self)
	resp, err := p.uploads.Do(out)
	if err != nil {
		if r.Context().Err() != nil {
			return true // the client left
		}
		p.markDown(s, holder, err)
		s.metrics.Request("upload", metrics.ResultError)
		s.log.Warn("replica holding an upload session unreachable", "holder", holder, "method", r.Method, "error", withoutURL(err))
		// The session went with its replica (or will be back): the client starts over.
		httpx.WriteError(w, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN", "the replica holding this upload is unreachable: start the upload again")
		return true
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusForbidden && resp.Header.Get(peerRefusedHeader) != "" {
		s.log.Error("replica holding an upload session refused this replica's peer authentication: do the replicas hold the same --peer-secret-file?", "holder", holder)
		s.metrics.Request("upload", metrics.ResultError)
		httpx.WriteError(w, http.StatusBadGateway, "UNAVAILABLE", "the replica holding this upload refused this replica")
		return true
	}
	s.log.Debug("upload request forwarded to the replica holding its session", "holder", holder, "method", r.Method, "status", resp.StatusCode)
	h := w.Header()
	for k, v := range resp.Header {
		h[k] = append([]string(nil), v...)
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, resp.Body)
	return true
}

// withoutURL is err without the URL a failed request names: its path holds the upload
// handle, which must not reach a log (see redactHandle).
func withoutURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
