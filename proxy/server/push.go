package server

import (
	"bufio"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/route"
	"github.com/cove-oci/cove/proxy/token"
)

// Push, written through to the origin. Every request goes to the origin with the
// client's own credentials, and the origin's answer (status, the headers a pushing
// client needs, errors and challenges) is what the client gets. On the way, blob bytes
// are spooled and manifests kept; they are stored only after the origin's 201, and the
// origin's 201 to this credential in this repository is what makes them servable there
// (authz.Learn): what a pushed manifest lists is never taken for membership.

// pushRelayed are the origin response headers of a push relayed besides
// httpx.RelayedResponseHeaders. Location is never copied: it is rewritten.
var pushRelayed = []string{"Range", "Docker-Upload-Uuid", "Oci-Subject"}

// maxPushErrorBody bounds an origin error body relayed to a pushing client.
const maxPushErrorBody = 1 << 20

// servePush routes the write requests: manifest PUT and blob uploads.
func (s *Server) servePush(w http.ResponseWriter, r *http.Request, req *route.Request) {
	if req.Kind == route.KindManifest {
		s.putManifest(w, r, req)
		return
	}
	switch {
	case req.Upload == "" && r.Method == http.MethodPost:
		s.startUpload(w, r, req)
	case req.Upload != "" && (r.Method == http.MethodPatch || r.Method == http.MethodPut || r.Method == http.MethodGet || r.Method == http.MethodDelete):
		s.continueUpload(w, r, req)
	default:
		s.metrics.Request("upload", metrics.ResultInvalid)
		if req.Upload == "" {
			w.Header().Set("Allow", "POST")
		} else {
			w.Header().Set("Allow", "GET, PATCH, PUT, DELETE")
		}
		httpx.WriteError(w, http.StatusMethodNotAllowed, "UNSUPPORTED", "method not allowed for this upload path")
	}
}

// pushHeaders are the client's request headers a push needs at the origin besides
// credentials: what the body is, and for a chunk, where it goes.
func pushHeaders(r *http.Request) http.Header {
	h := http.Header{}
	for _, k := range []string{"Content-Type", "Content-Range"} {
		if v := r.Header.Get(k); v != "" {
			h.Set(k, v)
		}
	}
	return h
}

// clientNS is the ns= value of cove-cache's own URLs for this client ("" without ns=).
func clientNS(req *route.Request) string {
	if req.ViaNamespace {
		return req.Registry
	}
	return ""
}

// objectLocation is cove-cache's URL of a blob or manifest in the client's naming.
func objectLocation(req *route.Request, kind string, d digest.Digest) string {
	loc := "/v2/" + req.Name + "/" + kind + "/" + d.String()
	if ns := clientNS(req); ns != "" {
		loc += "?ns=" + url.QueryEscape(ns)
	}
	return loc
}

// relayPush writes the origin's answer to a push request: its status, the allow-listed
// headers, Location as given (cove-cache's own URL, or none), and an error body.
func relayPush(w http.ResponseWriter, r *http.Request, resp *http.Response, location string) {
	h := w.Header()
	httpx.CopyRelayed(h, resp.Header)
	for _, k := range pushRelayed {
		if v, ok := resp.Header[k]; ok {
			h[k] = append([]string(nil), v...)
		}
	}
	if location != "" {
		h.Set("Location", location)
	}
	if resp.StatusCode == http.StatusUnauthorized {
		token.RewriteChallenge(r, h)
	}
	if resp.StatusCode < 400 {
		h.Del("Content-Length")
		h.Del("Content-Type")
		w.WriteHeader(resp.StatusCode)
		return
	}
	relay(w, r, resp.StatusCode, http.Header{}, io.LimitReader(resp.Body, maxPushErrorBody))
}

// bodyOf is what of the client's request body is sent on: nothing when it has none.
// It is read in large reads: the transport asks for 32 KiB at a time, and each read of
// the client's connection is a system call (a third of cove-cache's CPU in a push went to
// them), while the connection often holds far more.
func bodyOf(r *http.Request) (io.Reader, int64) {
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 {
		return nil, 0
	}
	return bufio.NewReaderSize(r.Body, bodyReadSize), r.ContentLength
}

// bodyReadSize is the read buffer of an upload's body.
const bodyReadSize = 512 << 10

// startUpload is POST /v2/<name>/blobs/uploads/: a session, a monolithic upload
// (digest=) or a cross-repository mount (mount= and from=).
func (s *Server) startUpload(w http.ResponseWriter, r *http.Request, req *route.Request) {
	ctx := r.Context()
	q := url.Values{}
	var mount digest.Digest
	if m := req.Query.Get("mount"); m != "" {
		if d, err := route.ParseDigest(m); err == nil {
			if from, ok := s.mountSource(req, req.Query.Get("from")); ok {
				mount = d
				q.Set("mount", d.String())
				q.Set("from", from)
			}
		}
	}
	want, monolithic := wantDigest(req.Query)
	if monolithic {
		q.Set("digest", want.String())
	}
	if !monolithic && s.uploads.full() {
		s.metrics.Request("upload", metrics.ResultError)
		w.Header().Set("Retry-After", "10")
		httpx.WriteError(w, http.StatusTooManyRequests, "TOOMANYREQUESTS", errTooManyUploads.Error())
		return
	}
	path := "/v2/" + req.Repository + "/blobs/uploads/"
	body, length := bodyOf(r)
	var sp *spool
	if monolithic && body != nil {
		sp = newSpool(s.uploads.tempPath())
		defer sp.discard()
		body = sp.tee(body, 0)
	}
	resp, err := s.origin.Send(ctx, http.MethodPost, req.Registry, path, q.Encode(), r.Header, pushHeaders(r), body, length)
	if err != nil {
		s.originUnavailable(w, req, "upload", err)
		return
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusCreated:
		d := mount
		if monolithic {
			d = want
		}
		location := ""
		if d != "" { // a 201 naming no digest (neither a monolithic upload nor a mount) teaches nothing
			s.commitBlob(r, req, sp, d)
			location = objectLocation(req, "blobs", d)
		}
		s.metrics.Request("upload", metrics.ResultPassthrough)
		relayPush(w, r, resp, location)
		return
	case http.StatusAccepted:
		// A session (an origin without monolithic POST, distribution among them, answers
		// one with a session too and ignores the body: the client goes on with it).
		p, rq, ok := originUploadURL(s.origin.URL(req.Registry, path, nil), resp.Header.Get("Location"), req.Repository)
		if !ok {
			s.badOrigin(w, req, errors.New("origin named an upload location outside its upload endpoint for the repository"))
			return
		}
		sess, err := s.uploads.open(req.Registry, req.Repository, p, rq)
		if err != nil {
			s.metrics.Request("upload", metrics.ResultError)
			w.Header().Set("Retry-After", "10")
			httpx.WriteError(w, http.StatusTooManyRequests, "TOOMANYREQUESTS", err.Error())
			return
		}
		s.metrics.Request("upload", metrics.ResultPassthrough)
		relayPush(w, r, resp, uploadLocation(req.Name, sess.handle, clientNS(req)))
		return
	}
	s.metrics.Request("upload", metrics.ResultForStatus(resp.StatusCode))
	relayPush(w, r, resp, "")
}

// mountSource maps a mount's from= (in the client's naming) to a repository of the
// request's registry; a source at another registry cannot be mounted (the mount is
// left out, and the origin starts a plain upload, as it does for a source it lacks).
func (s *Server) mountSource(req *route.Request, from string) (string, bool) {
	if from == "" {
		return "", false
	}
	if req.ViaNamespace {
		return from, route.ValidateRepository(from) == nil
	}
	registry, repo, err := s.router.SplitName(from)
	return repo, err == nil && registry == req.Registry
}

// continueUpload is a request naming an upload session: PATCH (a chunk), PUT (the last
// chunk, if any, and the digest), GET (status), DELETE (cancel).
func (s *Server) continueUpload(w http.ResponseWriter, r *http.Request, req *route.Request) {
	sess := s.uploads.get(req.Upload, req.Registry, req.Repository)
	if sess == nil && s.forwardUpload(w, r, req) {
		return // another replica holds it (peer_upload.go)
	}
	if sess == nil {
		s.metrics.Request("upload", metrics.ResultInvalid)
		httpx.WriteError(w, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN", "blob upload unknown to cove-cache")
		return
	}
	defer sess.mu.Unlock()
	ctx := r.Context()
	var body io.Reader
	var length int64
	rawQuery := sess.originQuery
	want, complete := digest.Digest(""), false
	var mark int64 // the spool's end before this request's chunk
	switch r.Method {
	case http.MethodPatch, http.MethodPut:
		body, length = bodyOf(r)
		if body != nil {
			mark = sess.spool.end()
			body = sess.spool.tee(body, chunkStart(r.Header.Get("Content-Range"), mark))
		}
		if r.Method == http.MethodPut {
			if want, complete = wantDigest(req.Query); complete {
				if rawQuery != "" {
					rawQuery += "&"
				}
				rawQuery += "digest=" + url.QueryEscape(want.String())
			}
		}
	}
	resp, err := s.origin.Send(ctx, r.Method, req.Registry, sess.originPath, rawQuery, r.Header, pushHeaders(r), body, length)
	_ = sess.spool.pause()
	if err != nil {
		sess.spool.drop() // what reached the origin is unknown
		s.originUnavailable(w, req, "upload", err)
		return
	}
	defer resp.Body.Close()
	status := resp.StatusCode
	switch {
	case r.Method == http.MethodPut && status == http.StatusCreated:
		if complete {
			s.commitBlob(r, req, sess.spool, want)
		}
		s.uploads.close(sess)
		s.metrics.Request("upload", metrics.ResultPassthrough)
		relayPush(w, r, resp, objectLocation(req, "blobs", want))
		return
	case r.Method == http.MethodDelete && status < 300, status == http.StatusNotFound:
		s.uploads.close(sess) // cancelled, or the origin no longer knows it
	case status == http.StatusAccepted || status == http.StatusNoContent:
		if loc := resp.Header.Get("Location"); loc != "" {
			base := s.origin.URL(req.Registry, sess.originPath, nil)
			p, rq, ok := originUploadURL(base, loc, req.Repository)
			if !ok {
				s.uploads.close(sess)
				s.badOrigin(w, req, errors.New("origin named an upload location outside its upload endpoint for the repository"))
				return
			}
			sess.originPath, sess.originQuery = p, rq
		}
		if n, ok := rangeEnd(resp.Header.Get("Range")); ok && !(n == 1 && sess.spool.end() == 0) {
			sess.spool.agree(n)
		} else if r.Method == http.MethodPatch && !ok {
			sess.spool.drop()
		}
		s.metrics.Request("upload", metrics.ResultPassthrough)
		relayPush(w, r, resp, uploadLocation(req.Name, sess.handle, clientNS(req)))
		return
	default:
		if body != nil && status >= 400 && status < 500 {
			sess.spool.rewind(mark) // refused: the origin took none of it
		} else if body != nil {
			sess.spool.drop() // what the origin kept of it is unknown
		}
	}
	s.metrics.Request("upload", metrics.ResultForStatus(status))
	relayPush(w, r, resp, "")
}

// chunkStart is where a chunk starts by its Content-Range (start-end, as the
// distribution spec writes it, or bytes start-end/total); next without one.
func chunkStart(h string, next int64) int64 {
	if h == "" {
		return next
	}
	h = strings.TrimPrefix(strings.TrimPrefix(h, "bytes"), " ")
	h = strings.TrimPrefix(h, "=")
	start, _, _ := strings.Cut(h, "-")
	n, err := strconv.ParseInt(start, 10, 64)
	if err != nil {
		return -1 // unreadable: the spool stops following
	}
	return n
}
