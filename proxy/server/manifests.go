package server

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/authz"
	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/route"
)

// maxManifestSize bounds what is read into memory: the distribution spec lets registries
// refuse manifests over 4 MiB, and every common one does.
const maxManifestSize = 4 << 20

func manifestPath(req *route.Request, ref string) string {
	return "/v2/" + req.Repository + "/manifests/" + ref
}

func (s *Server) serveManifest(w http.ResponseWriter, r *http.Request, req *route.Request) {
	if req.Digest != "" {
		s.serveManifestByDigest(w, r, req, req.Digest)
		return
	}
	s.serveManifestByTag(w, r, req)
}

// serveManifestByTag revalidates the tag at the origin on every resolve (a HEAD with the
// client's credentials and Accept), then serves the body from the cache when the digest
// is one it holds.
func (s *Server) serveManifestByTag(w http.ResponseWriter, r *http.Request, req *route.Request) {
	ctx := r.Context()
	tagPath := manifestPath(req, req.Tag)
	cred := authz.CredentialOf(r.Header)
	repo := authz.Object{Registry: req.Registry, Repository: req.Repository}
	if h, ok := s.authz.Challenge(cred, repo); ok {
		s.metrics.Request("manifest", metrics.ResultDenied)
		relay(w, r, http.StatusUnauthorized, h, nil)
		return
	}
	resp, err := s.origin.Do(ctx, http.MethodHead, req.Registry, tagPath, nil, r.Header, nil)
	if err != nil || resp.StatusCode >= 500 {
		if resp != nil {
			resp.Body.Close()
		}
		if s.serveStaleTag(w, r, req) {
			return
		}
		if err != nil {
			s.originUnavailable(w, req, "manifest", err)
			return
		}
		s.metrics.Request("manifest", metrics.ResultError)
		relay(w, r, resp.StatusCode, resp.Header, nil)
		return
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		if resp.StatusCode == http.StatusUnauthorized {
			s.authz.Refused(cred, repo, resp.Header)
		}
		s.metrics.Request("manifest", metrics.ResultForStatus(resp.StatusCode))
		relay(w, r, resp.StatusCode, resp.Header, nil)
		return
	}
	d, err := digest.Parse(resp.Header.Get("Docker-Content-Digest"))
	if err != nil {
		// An origin that names no digest on HEAD: take the body and digest it ourselves.
		s.fetchManifest(w, r, req, tagPath, "")
		return
	}
	// The origin just let this credential read this tag, which is d, in this repository:
	// its own word that the repository holds d.
	s.learn(r, req, d)
	s.rememberTag(ctx, req.Registry, req.Repository, req.Tag, d, resp.Header.Get("Content-Type"))
	if mediaType, size, ok := s.cachedManifest(r, req.Registry, d); ok {
		s.metrics.Request("manifest", metrics.ResultHit)
		s.serveStoredDigest(w, r, req.Registry, d, size, mediaType)
		if r.Method == http.MethodGet {
			s.checkListedStored(r, req, d, mediaType)
		}
		return
	}
	if r.Method == http.MethodHead {
		s.metrics.Request("manifest", metrics.ResultPassthrough)
		relay(w, r, http.StatusOK, resp.Header, nil)
		return
	}
	// Fetch by digest, not by tag: the tag may move between the HEAD and the GET.
	s.fetchManifest(w, r, req, manifestPath(req, d.String()), d)
}

func (s *Server) serveManifestByDigest(w http.ResponseWriter, r *http.Request, req *route.Request, d digest.Digest) {
	path := manifestPath(req, d.String())
	if mediaType, size, ok := s.cachedManifest(r, req.Registry, d); ok {
		if !s.authorize(w, r, req, path, d) {
			return
		}
		s.metrics.Request("manifest", metrics.ResultHit)
		s.serveStoredDigest(w, r, req.Registry, d, size, mediaType)
		if r.Method == http.MethodGet {
			s.checkListedStored(r, req, d, mediaType)
		}
		return
	}
	if r.Method == http.MethodHead {
		resp, err := s.origin.Do(r.Context(), http.MethodHead, req.Registry, path, nil, r.Header, nil)
		if err != nil {
			s.originUnavailable(w, req, "manifest", err)
			return
		}
		resp.Body.Close()
		s.metrics.Request("manifest", metrics.ResultPassthrough)
		relay(w, r, resp.StatusCode, resp.Header, nil)
		return
	}
	s.fetchManifest(w, r, req, path, d)
}

// serveStaleTag answers a tag the origin could not resolve, under the offline policy
// "recent": the last digest seen for it, if that manifest is cached, is a member of the
// repository, and this credential's allowance for the repository is recent enough.
func (s *Server) serveStaleTag(w http.ResponseWriter, r *http.Request, req *route.Request) bool {
	cred := authz.CredentialOf(r.Header)
	if !s.authz.OfflineAllows(cred, authz.Object{Registry: req.Registry, Repository: req.Repository}) {
		return false
	}
	b, err := s.store.GetRecord(r.Context(), tagKey(req.Registry, req.Repository, req.Tag))
	if err != nil {
		return false
	}
	var rec tagRecord
	if json.Unmarshal(b, &rec) != nil || rec.Digest.Validate() != nil ||
		!s.authz.IsMember(r.Context(), authz.Object{Registry: req.Registry, Repository: req.Repository, Digest: rec.Digest}) {
		return false
	}
	mediaType, size, ok := s.cachedManifest(r, req.Registry, rec.Digest)
	if !ok {
		return false
	}
	s.markStale(w, req)
	s.serveStoredDigest(w, r, req.Registry, rec.Digest, size, mediaType)
	return true
}

// cachedManifest reports whether the manifest d, fetched from registry, is stored.
func (s *Server) cachedManifest(r *http.Request, registry string, d digest.Digest) (string, int64, bool) {
	size, ok := s.hasBlob(r.Context(), registry, d)
	if !ok {
		return "", 0, false
	}
	mediaType, ok := s.manifestMediaType(r.Context(), registry, d)
	return mediaType, size, ok
}

// fetchManifest GETs a manifest from the origin, verifies it against want (or, when want
// is empty, against the digest the origin names, else its own digest), stores it and
// serves it. Manifests are small: they are read whole, never streamed unverified.
func (s *Server) fetchManifest(w http.ResponseWriter, r *http.Request, req *route.Request, path string, want digest.Digest) {
	ctx := r.Context()
	resp, err := s.origin.Do(ctx, http.MethodGet, req.Registry, path, nil, r.Header, nil)
	if err != nil {
		s.originUnavailable(w, req, "manifest", err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		s.metrics.Request("manifest", metrics.ResultForStatus(resp.StatusCode))
		relay(w, r, resp.StatusCode, resp.Header, io.LimitReader(resp.Body, maxManifestSize))
		return
	}
	if resp.ContentLength > maxManifestSize {
		s.badOrigin(w, req, fmt.Errorf("manifest of %d bytes is over the %d-byte limit", resp.ContentLength, maxManifestSize))
		return
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	if err != nil {
		s.originUnavailable(w, req, "manifest", err)
		return
	}
	if len(body) > maxManifestSize {
		s.badOrigin(w, req, fmt.Errorf("manifest over the %d-byte limit", maxManifestSize))
		return
	}
	if resp.ContentLength >= 0 && int64(len(body)) != resp.ContentLength {
		s.badOrigin(w, req, fmt.Errorf("manifest truncated: %d of %d bytes", len(body), resp.ContentLength))
		return
	}
	d := want
	if d == "" {
		if named, err := digest.Parse(resp.Header.Get("Docker-Content-Digest")); err == nil {
			d = named
		} else {
			d = digest.FromBytes(body)
		}
	}
	if d.Validate() != nil || d.Algorithm().FromBytes(body) != d {
		s.badOrigin(w, req, fmt.Errorf("manifest body does not match digest %s", d))
		return
	}
	mediaType := manifestMediaType(body, resp.Header.Get("Content-Type"))
	if req.Tag != "" {
		s.rememberTag(ctx, req.Registry, req.Repository, req.Tag, d, mediaType)
	}
	if err := s.storeManifest(r, req.Registry, d, mediaType, body); err != nil {
		s.log.Error("storing manifest failed", "registry", req.Registry, "digest", d, "error", err)
	}
	// The origin served this manifest to this credential in this repository.
	s.learn(r, req, d)
	if r.Method == http.MethodGet {
		s.checkListed(r, req, mediaType, body)
	}
	s.metrics.Request("manifest", metrics.ResultMiss)
	h := w.Header()
	h.Set("Content-Type", mediaType)
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Etag", `"`+d.String()+`"`)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		n, _ := w.Write(body)
		s.metrics.Sent(req.Registry, "fill", int64(n))
	}
}

// storeManifest stores a verified manifest: body, media type, then provenance (last, as
// it is what makes the manifest servable).
func (s *Server) storeManifest(r *http.Request, registry string, d digest.Digest, mediaType string, body []byte) error {
	ctx := r.Context()
	if err := s.store.Put(ctx, d, int64(len(body)), bytes.NewReader(body)); err != nil {
		return err
	}
	rec, _ := json.Marshal(manifestRecord{MediaType: mediaType})
	if err := s.store.PutRecord(ctx, manifestTypeKey(d, registry), rec); err != nil {
		return err
	}
	return s.recordProvenance(ctx, registry, d)
}

// badOrigin answers when the origin's answer cannot be trusted (wrong digest, too large,
// truncated): nothing is stored, and the client falls back to the origin.
func (s *Server) badOrigin(w http.ResponseWriter, req *route.Request, err error) {
	s.log.Warn("origin answer rejected", "registry", req.Registry, "repository", req.Repository, "error", err)
	s.metrics.Request(req.Kind.String(), metrics.ResultError)
	httpx.WriteError(w, http.StatusBadGateway, "UNKNOWN", "origin registry sent an invalid answer")
}
