package server

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/authz"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/route"
)

// Content management (the distribution spec's DELETE of a manifest or a blob), written
// through to the origin. The request goes to the origin with the client's own
// credentials and the origin's answer is what the client gets: its 202, its 405 when
// deletion is disabled there, its 401 challenge. Only on its 202 does cove-cache forget
// what it knows of that object in that repository: the membership that made the digest
// servable there, and tag records. The stored bytes stay: other repositories and
// registries may hold the same digest, and what serves them is their own membership.
// An origin's refusal (401, 403, 404, 405) changes nothing: a client cannot make
// cove-cache forget what the origin did not let it delete.

// serveDelete is DELETE /v2/<name>/manifests/<reference> and /v2/<name>/blobs/<digest>.
func (s *Server) serveDelete(w http.ResponseWriter, r *http.Request, req *route.Request) {
	op := req.Kind.String()
	var path string
	switch {
	case req.Kind == route.KindManifest && req.Digest != "":
		path = manifestPath(req, req.Digest.String())
	case req.Kind == route.KindManifest:
		path = manifestPath(req, req.Tag)
	default:
		path = "/v2/" + req.Repository + "/blobs/" + req.Digest.String()
	}
	// A referrer's subject, read before the manifest is gone.
	var subject digest.Digest
	if req.Kind == route.KindManifest && req.Digest != "" {
		subject, _ = s.manifestSubject(r.Context(), r, req, req.Digest)
	}
	resp, err := s.origin.Send(r.Context(), http.MethodDelete, req.Registry, path, "", r.Header, nil, nil, 0)
	if err != nil {
		s.originUnavailable(w, req, op, err)
		return
	}
	defer resp.Body.Close()
	// A 401 is not remembered as a refusal to read: a credential may read what it may not
	// delete, and its reads must not get this challenge back.
	if resp.StatusCode == http.StatusAccepted {
		ctx := context.WithoutCancel(r.Context())
		s.forgetDeleted(ctx, req)
		if subject != "" {
			s.referrers.dropSubject(req.Registry, req.Repository, subject)
			s.unlistReferrer(ctx, r, req, subject, req.Digest)
		}
		s.metrics.Request(op, metrics.ResultPassthrough)
	} else {
		s.metrics.Request(op, metrics.ResultForStatus(resp.StatusCode))
	}
	relayPush(w, r, resp, "")
}

// forgetDeleted drops what cove-cache knows of the object the origin just deleted in
// req's repository (its 202).
func (s *Server) forgetDeleted(ctx context.Context, req *route.Request) {
	repo := authz.Object{Registry: req.Registry, Repository: req.Repository}
	if req.Kind == route.KindManifest && req.Digest == "" {
		// A tag deleted: the manifest it named may stay in the repository (distribution
		// untags); only what the tag said goes.
		s.forgetTag(ctx, req.Registry, req.Repository, req.Tag)
		if subject, ok := tagSchemaSubject(req.Tag); ok {
			s.referrers.dropSubject(req.Registry, req.Repository, subject)
		}
		s.log.Info("deleted at the origin: tag forgotten", "registry", req.Registry, "repository", req.Repository, "tag", req.Tag)
		return
	}
	d := req.Digest
	repo.Digest = d
	// A push of d just answered is committed first: its membership must not come back
	// after this.
	s.waitStored(ctx, req.Registry, d)
	s.authz.Forget(ctx, repo)
	if req.Kind == route.KindManifest {
		// Deleting a manifest removes the tags that name it, at the origin; and a referrer
		// leaves its subject's list.
		s.forgetTagsOf(ctx, req.Registry, req.Repository, d)
	}
	s.log.Info("deleted at the origin: membership forgotten", "registry", req.Registry, "repository", req.Repository, "kind", req.Kind.String(), "digest", d)
}

// forgetTag removes the record of a tag's last digest.
func (s *Server) forgetTag(ctx context.Context, registry, repo, tag string) {
	if err := s.store.DeleteRecord(ctx, tagKey(registry, repo, tag)); err != nil && !isNotFound(err) {
		s.log.Warn("forgetting a deleted tag failed", "registry", registry, "repository", repo, "tag", tag, "error", err)
	}
}

// forgetTagsOf removes the tag records of repo (not of repositories under it) whose last
// digest is d.
func (s *Server) forgetTagsOf(ctx context.Context, registry, repo string, d digest.Digest) {
	prefix := tagKey(registry, repo, "")
	prefix = prefix[:len(prefix)-1] // ".../<repo>/": the ListRecords prefix is whole segments
	var tags []string
	err := s.store.ListRecords(ctx, prefix, func(key string) error {
		tag, ok := strings.CutPrefix(key[len(prefix):], "@")
		if !ok || strings.Contains(tag, "/") {
			return nil // a record of a repository under repo
		}
		b, err := s.store.GetRecord(ctx, key)
		if err != nil {
			return nil // gone meanwhile
		}
		var rec tagRecord
		if json.Unmarshal(b, &rec) == nil && rec.Digest == d {
			tags = append(tags, tag)
		}
		return nil
	})
	if err != nil && !isNotFound(err) {
		s.log.Warn("listing the tags of a deleted manifest failed", "registry", registry, "repository", repo, "error", err)
	}
	for _, tag := range tags {
		s.forgetTag(ctx, registry, repo, tag)
	}
}

// storedSubject is the subject of manifest d as cove-cache stored it from registry.
func (s *Server) storedSubject(ctx context.Context, registry string, d digest.Digest) (digest.Digest, bool) {
	size, ok := s.hasBlob(ctx, registry, d)
	if !ok || size > maxManifestSize {
		return "", false
	}
	b, err := s.store.Open(ctx, d)
	if err != nil {
		return "", false
	}
	defer b.Close()
	body, err := io.ReadAll(io.LimitReader(b, maxManifestSize))
	if err != nil {
		return "", false
	}
	return subjectOf(body)
}

// tagSchemaSubject reads a referrers tag-schema tag (<alg>-<hex>): the subject whose list
// it holds.
func tagSchemaSubject(tag string) (digest.Digest, bool) {
	alg, hex, ok := strings.Cut(tag, "-")
	if !ok {
		return "", false
	}
	d := digest.NewDigestFromEncoded(digest.Algorithm(alg), hex)
	return d, d.Validate() == nil
}
