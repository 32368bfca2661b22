package server

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/route"
)

// putManifest is PUT /v2/<name>/manifests/<tag or digest>: the manifest goes to the
// origin as the client sent it, and when the origin answers 201 it is stored (body,
// media type for this registry, provenance), learned as a member of this repository on
// the origin's word to this credential, and a tag's record updated. What it lists
// (layers, config, subject, an index's manifests) teaches nothing: each is servable in
// this repository only on the origin's own 201 or 200 for it there.
func (s *Server) putManifest(w http.ResponseWriter, r *http.Request, req *route.Request) {
	ctx := r.Context()
	if r.ContentLength > maxManifestSize {
		s.metrics.Request("manifest", metrics.ResultInvalid)
		httpx.WriteError(w, http.StatusRequestEntityTooLarge, "SIZE_INVALID", "manifest over the 4 MiB limit")
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxManifestSize+1))
	if err != nil {
		return // the client went away
	}
	if len(body) > maxManifestSize {
		s.metrics.Request("manifest", metrics.ResultInvalid)
		httpx.WriteError(w, http.StatusRequestEntityTooLarge, "SIZE_INVALID", "manifest over the 4 MiB limit")
		return
	}
	ref := req.Tag
	if req.Digest != "" {
		ref = req.Digest.String()
	}
	resp, err := s.origin.Send(ctx, http.MethodPut, req.Registry, manifestPath(req, ref), "", r.Header,
		pushHeaders(r), bytes.NewReader(body), int64(len(body)))
	if err != nil {
		s.originUnavailable(w, req, "manifest", err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		s.metrics.Request("manifest", metrics.ResultForStatus(resp.StatusCode))
		relayPush(w, r, resp, "")
		return
	}
	s.forgetReferrers(req, body)
	d := req.Digest
	if d == "" {
		d = digest.FromBytes(body)
	}
	// Keep it only when the bytes are the digest the client and the origin name.
	named := resp.Header.Get("Docker-Content-Digest")
	if d.Validate() == nil && d.Algorithm().FromBytes(body) == d && (named == "" || named == d.String()) {
		s.commitManifest(r, req, d, body)
	} else {
		s.log.Info("pushed manifest not kept: its bytes do not match the digest named", "registry", req.Registry, "repository", req.Repository)
	}
	s.metrics.Request("manifest", metrics.ResultPassthrough)
	relayPush(w, r, resp, objectLocation(req, "manifests", d))
}

// keepPushedManifest stores a manifest the origin accepted in req's repository
// (commitManifest runs it in the background, on a context of its own).
func (s *Server) keepPushedManifest(r *http.Request, req *route.Request, d digest.Digest, body []byte) {
	// The origin's 201 to this credential for d in this repository.
	s.learn(r, req, d)
	mediaType := manifestMediaType(body, r.Header.Get("Content-Type"))
	if err := s.storeManifest(r, req.Registry, d, mediaType, body); err != nil {
		s.log.Warn("storing a pushed manifest failed", "registry", req.Registry, "digest", d, "error", err)
		return
	}
	if req.Tag != "" {
		s.rememberTag(r.Context(), req.Registry, req.Repository, req.Tag, d, mediaType)
	}
}

// forgetReferrers ends the kept referrers lists of the subject a manifest accepted in
// req's repository names: the next request asks the origin, which now lists it.
func (s *Server) forgetReferrers(req *route.Request, body []byte) {
	var m ocispec.Manifest // an index's subject has the same field
	if json.Unmarshal(body, &m) == nil && m.Subject != nil && m.Subject.Digest.Validate() == nil {
		s.referrers.dropSubject(req.Registry, req.Repository, m.Subject.Digest)
	}
	// A client updating the tag schema's index itself (origins without the API).
	if d, ok := tagSchemaSubject(req.Tag); ok {
		s.referrers.dropSubject(req.Registry, req.Repository, d)
	}
}
