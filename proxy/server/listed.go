package server

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/proxy/authz"
	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/route"
)

// manifestMediaType is what a manifest is: what its own bytes say (mediaType) where they
// say it, otherwise the Content-Type the registry named in the request gave. The bytes
// are pinned by the digest; a header is only one registry's word.
func manifestMediaType(body []byte, contentType string) string {
	var probe struct {
		MediaType string `json:"mediaType"`
	}
	if json.Unmarshal(body, &probe) == nil && probe.MediaType != "" {
		return probe.MediaType
	}
	return contentType
}

// listed is a digest a manifest names, and whether it is a manifest (an index's child)
// or a blob.
type listed struct {
	digest   digest.Digest
	manifest bool
}

// listedObjects returns what a manifest names for a pull: an index's manifests, or an
// image manifest's config and layers. A subject is not listed: it is no part of a pull.
func listedObjects(mediaType string, body []byte) []listed {
	var out []listed
	if images.IsIndexType(mediaType) {
		var idx ocispec.Index
		if json.Unmarshal(body, &idx) != nil {
			return nil
		}
		for _, m := range idx.Manifests {
			out = append(out, listed{m.Digest, true})
		}
		return out
	}
	var m ocispec.Manifest
	if json.Unmarshal(body, &m) != nil {
		return nil
	}
	if m.Config.Digest != "" {
		out = append(out, listed{m.Config.Digest, false})
	}
	for _, l := range m.Layers {
		out = append(out, listed{l.Digest, false})
	}
	return out
}

// maxListedChecks bounds the origin checks running ahead of clients, cache-wide.
const maxListedChecks = 16

// checkListed schedules, for what a manifest just served to this client lists and the
// cache already holds but does not know to be in this repository, the origin checks the
// client's next requests would need: in parallel, ahead of them. A listing is never
// taken as the origin's word (registries accept manifests naming digests a repository
// does not hold); each check is authz.MayRead, which asks the origin with the client's
// own credentials and learns only from its answer. Best effort: when the checks are
// busy, clients ask on their own.
func (s *Server) checkListed(r *http.Request, req *route.Request, mediaType string, body []byte) {
	cred := authz.CredentialOf(r.Header)
	header := httpx.OriginRequestHeaders(r.Header) // a copy: the checks outlive r
	for _, l := range listedObjects(mediaType, body) {
		obj := authz.Object{Registry: req.Registry, Repository: req.Repository, Digest: l.digest}
		if l.digest.Validate() != nil || s.authz.IsMember(r.Context(), obj) {
			continue
		}
		if _, ok := s.hasBlob(r.Context(), req.Registry, l.digest); !ok {
			continue // a miss: its fill's own GET is the check
		}
		path := "/v2/" + req.Repository + "/blobs/" + l.digest.String()
		if l.manifest {
			path = manifestPath(req, l.digest.String())
		}
		select {
		case s.listedChecks <- struct{}{}:
		default:
			return
		}
		go func() {
			defer func() { <-s.listedChecks }()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if dec := s.authz.MayRead(ctx, cred, obj, s.askOrigin(header, req.Registry, path)); dec.Asked {
				s.metrics.AuthzCheck()
			}
		}()
	}
}

// checkListedStored is checkListed for a manifest served from the cache.
func (s *Server) checkListedStored(r *http.Request, req *route.Request, d digest.Digest, mediaType string) {
	b, err := s.store.Open(r.Context(), d)
	if err != nil {
		return
	}
	defer b.Close()
	if b.Size() > maxManifestSize {
		return
	}
	body := make([]byte, b.Size())
	if _, err := io.ReadFull(b, body); err != nil {
		return
	}
	s.checkListed(r, req, mediaType, body)
}
