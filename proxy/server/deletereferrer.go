package server

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/proxy/authz"
	"github.com/cove-oci/cove/proxy/route"
)

// Deleting a referrer. cove-cache answers the referrers API for an origin without one,
// from the tag schema's index (referrers.go); a client therefore takes the API for
// supported and, when it deletes a referrer, leaves the index to the registry, as the
// spec lets it. So cove-cache does what a registry with the API does: after the origin's
// 202 to the referrer's DELETE, it removes the referrer from its subject's tag-schema
// index at the origin, with the client's own credentials (the origin decides whether
// they may), as oras-go does for a registry without the API.

// manifestSubject is the subject of manifest d in req's repository: from the store when
// cove-cache holds it, else from the origin, asked with the client's credentials.
func (s *Server) manifestSubject(ctx context.Context, r *http.Request, req *route.Request, d digest.Digest) (digest.Digest, bool) {
	if subject, ok := s.storedSubject(ctx, req.Registry, d); ok {
		return subject, true
	}
	if _, stored := s.hasBlob(ctx, req.Registry, d); stored {
		return "", false // held, and names no subject
	}
	resp, err := s.origin.Do(ctx, http.MethodGet, req.Registry, manifestPath(req, d.String()), nil, r.Header,
		http.Header{"Accept": {acceptAllManifests}})
	if err != nil {
		return "", false
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	if err != nil || resp.StatusCode != http.StatusOK || len(body) > maxManifestSize || d.Validate() != nil || d.Algorithm().FromBytes(body) != d {
		return "", false
	}
	return subjectOf(body)
}

// acceptAllManifests is what a manifest GET of cove-cache's own accepts.
const acceptAllManifests = ocispec.MediaTypeImageManifest + ", " + ocispec.MediaTypeImageIndex + ", " +
	images.MediaTypeDockerSchema2Manifest + ", " + images.MediaTypeDockerSchema2ManifestList

func subjectOf(body []byte) (digest.Digest, bool) {
	var m ocispec.Manifest // an index's subject has the same field
	if json.Unmarshal(body, &m) != nil || m.Subject == nil || m.Subject.Digest.Validate() != nil {
		return "", false
	}
	return m.Subject.Digest, true
}

// unlistReferrer removes d from subject's tag-schema index in req's repository at the
// origin, if the index lists it: the index without it is put under the same tag, and the
// old index deleted (best effort, as oras-go does).
func (s *Server) unlistReferrer(ctx context.Context, r *http.Request, req *route.Request, subject, d digest.Digest) {
	tagReq := *req
	tagReq.Digest = subject
	tag := referrersTag(&tagReq)
	path := manifestPath(req, tag)
	resp, err := s.origin.Do(ctx, http.MethodGet, req.Registry, path, nil, r.Header, http.Header{"Accept": {ocispec.MediaTypeImageIndex}})
	if err != nil {
		return
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || len(body) > maxManifestSize {
		return // no such index (an origin with the API, or nothing else refers), or refused
	}
	var idx ocispec.Index
	if json.Unmarshal(body, &idx) != nil || !images.IsIndexType(manifestMediaType(body, resp.Header.Get("Content-Type"))) {
		return
	}
	kept := make([]ocispec.Descriptor, 0, len(idx.Manifests))
	for _, m := range idx.Manifests {
		if m.Digest != d {
			kept = append(kept, m)
		}
	}
	if len(kept) == len(idx.Manifests) {
		return
	}
	idx.Manifests = kept
	if idx.MediaType == "" {
		idx.MediaType = ocispec.MediaTypeImageIndex
	}
	newBody, err := json.Marshal(idx)
	if err != nil {
		return
	}
	put, err := s.origin.Send(ctx, http.MethodPut, req.Registry, path, "", r.Header,
		http.Header{"Content-Type": {ocispec.MediaTypeImageIndex}}, bytes.NewReader(newBody), int64(len(newBody)))
	if err != nil {
		s.log.Warn("removing a deleted referrer from its subject's index failed", "registry", req.Registry, "repository", req.Repository, "digest", d, "error", err)
		return
	}
	put.Body.Close()
	if put.StatusCode != http.StatusCreated {
		s.log.Warn("removing a deleted referrer from its subject's index refused by the origin", "registry", req.Registry, "repository", req.Repository, "digest", d, "status", put.StatusCode)
		return
	}
	s.referrers.dropSubject(req.Registry, req.Repository, subject)
	old := digest.FromBytes(body)
	if del, err := s.origin.Send(ctx, http.MethodDelete, req.Registry, manifestPath(req, old.String()), "", r.Header, nil, nil, 0); err == nil {
		del.Body.Close()
		if del.StatusCode == http.StatusAccepted {
			s.authz.Forget(ctx, authz.Object{Registry: req.Registry, Repository: req.Repository, Digest: old})
		}
	}
	s.log.Info("deleted referrer removed from its subject's index", "registry", req.Registry, "repository", req.Repository, "digest", d, "subject", subject)
}
