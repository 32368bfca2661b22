package server

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/images"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/proxy/authz"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/route"
)

// The referrers API: GET /v2/<name>/referrers/<digest>[?artifactType=T].
//
// The answer is asked of the origin with the client's credentials; an origin without the
// API (404: distribution v3 has none) is answered from the tag schema, the index tagged
// <alg>-<hex> in the repository, fetched through the manifest path (revalidated at the
// origin like any tag, authorized, cached by digest). Either way the list is kept for the
// referrers TTL and served again only to a credential the origin allowed in that
// repository within the allowance TTL (authz.MayReadRepository). An empty result is an
// empty index, never a 404.

const filterArtifactType = "artifactType"

func referrersPath(req *route.Request) string {
	return "/v2/" + req.Repository + "/referrers/" + req.Digest.String()
}

func (s *Server) serveReferrers(w http.ResponseWriter, r *http.Request, req *route.Request) {
	ctx := r.Context()
	cred := authz.CredentialOf(r.Header)
	repo := authz.Object{Registry: req.Registry, Repository: req.Repository}
	key := referrersKey(req)
	kept, fresh, ok := s.referrers.get(key)
	var resp *http.Response
	ask := func(ctx context.Context) authz.OriginAnswer {
		var err error
		resp, err = s.origin.Do(ctx, http.MethodGet, req.Registry, referrersPath(req), req.Query, r.Header, nil)
		if err != nil {
			return authz.OriginAnswer{Err: err}
		}
		return authz.OriginAnswer{Status: resp.StatusCode, Header: resp.Header}
	}
	dec := s.authz.MayReadRepository(ctx, cred, repo, ask)
	if dec.Asked {
		s.metrics.AuthzCheck()
	}
	if dec.Verdict == authz.Allow && !dec.Asked {
		if fresh {
			s.writeReferrers(w, r, req, kept, metrics.ResultHit, "cache")
			return
		}
		// Allowed, but nothing fresh to serve: the origin's answer is needed anyway.
		dec = s.authz.RepositoryAnswer(cred, repo, ask(ctx))
	}
	if resp != nil {
		defer resp.Body.Close()
	}
	switch dec.Verdict {
	case authz.AllowStale:
		if ok {
			s.markStale(w, req)
			s.writeReferrers(w, r, req, kept, metrics.ResultStale, "cache")
			return
		}
		if dec.Err != nil || resp == nil {
			s.originUnavailable(w, req, "referrers", dec.Err)
			return
		}
		s.metrics.Request("referrers", metrics.ResultError)
		relay(w, r, resp.StatusCode, resp.Header, nil)
		return
	case authz.Unavailable:
		s.originUnavailable(w, req, "referrers", dec.Err)
		return
	case authz.Deny:
		if dec.Status == http.StatusNotFound && resp != nil {
			s.referrersFromTag(w, r, req, key)
			return
		}
		s.metrics.Request("referrers", metrics.ResultForStatus(dec.Status))
		var body io.Reader
		if resp != nil {
			body = io.LimitReader(resp.Body, maxManifestSize)
		}
		relay(w, r, dec.Status, dec.Header, body)
		return
	}
	s.referrersFromOrigin(w, r, req, key, resp)
}

// referrersFromOrigin keeps and serves the origin's own referrers answer (a 200).
func (s *Server) referrersFromOrigin(w http.ResponseWriter, r *http.Request, req *route.Request, key string, resp *http.Response) {
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxManifestSize+1))
	if err != nil {
		s.originUnavailable(w, req, "referrers", err)
		return
	}
	if len(body) > maxManifestSize {
		s.badOrigin(w, req, fmt.Errorf("referrers list over the %d-byte limit", maxManifestSize))
		return
	}
	var idx ocispec.Index
	if err := json.Unmarshal(body, &idx); err != nil {
		s.badOrigin(w, req, fmt.Errorf("referrers list is not an image index: %w", err))
		return
	}
	ans := &referrersAnswer{body: body, link: resp.Header.Get("Link")}
	if want := req.Query.Get(filterArtifactType); want != "" {
		ans.filtered = true
		if !filtersApplied(resp.Header, filterArtifactType) {
			// The origin did not filter: cove-cache does, and says so.
			ans.body = marshalIndex(filterReferrers(idx, want))
		}
	}
	s.referrers.put(key, ans)
	s.writeReferrers(w, r, req, ans, metrics.ResultMiss, "fill")
}

// referrersFromTag answers for an origin without the referrers API from the tag schema:
// the index tagged <alg>-<hex> in the repository, through the manifest path, filtered by
// cove-cache when asked. No such tag is an empty list.
func (s *Server) referrersFromTag(w http.ResponseWriter, r *http.Request, req *route.Request, key string) {
	tagReq := *req
	tagReq.Kind = route.KindManifest
	tagReq.Digest = ""
	tagReq.Query = url.Values{}
	tagReq.Tag = referrersTag(req)
	hdr := r.Header.Clone()
	hdr.Set("Accept", ocispec.MediaTypeImageIndex)
	tr := r.Clone(r.Context())
	tr.Method = http.MethodGet
	tr.Header = hdr
	tr.URL = &url.URL{Path: manifestPath(&tagReq, tagReq.Tag)}
	got := &bufferedResponse{header: http.Header{}}
	s.serveManifestByTag(got, tr, &tagReq)
	stale := got.header.Get("Warning") != ""
	var idx ocispec.Index
	switch got.status {
	case http.StatusOK:
		if err := json.Unmarshal(got.body.Bytes(), &idx); err != nil ||
			!images.IsIndexType(manifestMediaType(got.body.Bytes(), got.header.Get("Content-Type"))) {
			idx = ocispec.Index{} // not a referrers index: nothing refers to the subject
		}
	case http.StatusNotFound:
		idx = ocispec.Index{}
	default:
		// The origin's refusal (a 401 and its challenge, already relayed in form).
		for k, v := range got.header {
			w.Header()[k] = v
		}
		s.metrics.Request("referrers", metrics.ResultForStatus(got.status))
		w.WriteHeader(got.status)
		if r.Method != http.MethodHead {
			w.Write(got.body.Bytes())
		}
		return
	}
	ans := &referrersAnswer{}
	if got.status == http.StatusOK && idx.Manifests != nil {
		ans.body = got.body.Bytes() // the tag's index, byte for byte
	}
	if want := req.Query.Get(filterArtifactType); want != "" {
		idx, ans.filtered, ans.body = filterReferrers(idx, want), true, nil
	}
	if ans.body == nil {
		ans.body = marshalIndex(idx)
	}
	if stale {
		w.Header().Set("Warning", got.header.Get("Warning"))
		s.writeReferrers(w, r, req, ans, metrics.ResultStale, "cache")
		return
	}
	// A 404 may be the answer to a credential the origin refuses (some registries answer
	// so): only an allowed credential's empty list is kept.
	if got.status == http.StatusOK || s.authz.AllowedNow(authz.CredentialOf(r.Header), authz.Object{Registry: req.Registry, Repository: req.Repository}) {
		s.referrers.put(key, ans)
	}
	s.writeReferrers(w, r, req, ans, metrics.ResultMiss, "fill")
}

// referrersTag is the tag schema's tag for the subject: <alg>-<hex>, at most 128
// characters (the distribution spec truncates).
func referrersTag(req *route.Request) string {
	t := req.Digest.Algorithm().String() + "-" + req.Digest.Encoded()
	if len(t) > 128 {
		t = t[:128]
	}
	return t
}

func (s *Server) writeReferrers(w http.ResponseWriter, r *http.Request, req *route.Request, ans *referrersAnswer, result, source string) {
	h := w.Header()
	h.Set("Content-Type", ocispec.MediaTypeImageIndex)
	if ans.filtered {
		h.Set("OCI-Filters-Applied", filterArtifactType)
	}
	if ans.link != "" {
		h.Set("Link", ans.link)
	}
	h.Set("Content-Length", strconv.Itoa(len(ans.body)))
	s.metrics.Request("referrers", result)
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		n, _ := w.Write(ans.body)
		s.metrics.Sent(req.Registry, source, int64(n))
	}
}

func filtersApplied(h http.Header, filter string) bool {
	for _, v := range h.Values("OCI-Filters-Applied") {
		for _, f := range strings.Split(v, ",") {
			if strings.TrimSpace(f) == filter {
				return true
			}
		}
	}
	return false
}

// filterReferrers keeps the descriptors whose artifactType is want.
func filterReferrers(idx ocispec.Index, want string) ocispec.Index {
	kept := []ocispec.Descriptor{}
	for _, d := range idx.Manifests {
		if d.ArtifactType == want {
			kept = append(kept, d)
		}
	}
	idx.Manifests = kept
	return idx
}

// marshalIndex writes idx as a referrers answer: schemaVersion 2, the index media type,
// and manifests as a list (empty, never null).
func marshalIndex(idx ocispec.Index) []byte {
	idx.Versioned = specs.Versioned{SchemaVersion: 2}
	idx.MediaType = ocispec.MediaTypeImageIndex
	if idx.Manifests == nil {
		idx.Manifests = []ocispec.Descriptor{}
	}
	b, _ := json.Marshal(idx)
	return b
}

// bufferedResponse keeps an answer of the manifest path in memory (a manifest is at most
// maxManifestSize) for the referrers fallback to read.
type bufferedResponse struct {
	header http.Header
	status int
	body   bytes.Buffer
}

var errBufferFull = errors.New("referrers: manifest answer over the size limit")

func (b *bufferedResponse) Header() http.Header { return b.header }

func (b *bufferedResponse) WriteHeader(status int) {
	if b.status == 0 {
		b.status = status
	}
}

func (b *bufferedResponse) Write(p []byte) (int, error) {
	b.WriteHeader(http.StatusOK)
	if b.body.Len()+len(p) > maxManifestSize+1<<16 {
		return 0, errBufferFull
	}
	return b.body.Write(p)
}
