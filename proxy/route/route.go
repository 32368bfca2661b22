// Package route turns an incoming OCI distribution request into the origin registry,
// repository and object it names, validating every part against the distribution grammar
// before anything else looks at it.
//
// Two routing styles are accepted, because clients differ in what they can send:
//
//   - containerd adds ?ns=<registry host> to every request it sends to a mirror, so the
//     path is the plain repository: /v2/team/app/manifests/v1?ns=ghcr.io
//   - docker, crane and skopeo cannot add a query, so the registry host is the first path
//     element: /v2/ghcr.io/team/app/manifests/v1
//
// A request with neither goes to the default registry (Docker Hub unless configured),
// which is what a docker daemon's registry-mirrors setting expects.
package route

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
)

// Kind is the kind of object a request addresses.
type Kind int

const (
	KindPing      Kind = iota // GET /v2/
	KindManifest              // /v2/<name>/manifests/<reference>
	KindBlob                  // /v2/<name>/blobs/<digest>
	KindTags                  // /v2/<name>/tags/list
	KindReferrers             // /v2/<name>/referrers/<digest>
	KindUpload                // /v2/<name>/blobs/uploads/[<handle>]
)

func (k Kind) String() string {
	switch k {
	case KindPing:
		return "ping"
	case KindManifest:
		return "manifest"
	case KindBlob:
		return "blob"
	case KindTags:
		return "tags"
	case KindReferrers:
		return "referrers"
	case KindUpload:
		return "upload"
	}
	return "unknown"
}

// DockerHub is the canonical name of Docker Hub; its API is served by DockerHubAPIHost.
const (
	DockerHub        = "docker.io"
	DockerHubAPIHost = "registry-1.docker.io"
)

// Request is a validated distribution request.
type Request struct {
	// Registry is the canonical registry host (docker.io for Docker Hub, never
	// registry-1.docker.io), used for provenance and metrics.
	Registry string
	// Repository is the repository path at that registry (library/alpine, team/app).
	Repository string
	// Name is the repository name as the client wrote it in the path: the repository
	// itself with ns=, else with the registry prefix it carried (ghcr.io/team/app) or none
	// (alpine). Token scopes the client asks cove-cache for use this form.
	Name string
	Kind Kind
	// Tag is set for manifest requests by tag.
	Tag string
	// Digest is set for blob, referrers and manifest-by-digest requests.
	Digest digest.Digest
	// Upload is set for upload requests that name a session (/blobs/uploads/<handle>):
	// cove-cache's opaque handle, checked against the handle grammar only; empty for the
	// POST that starts an upload.
	Upload string
	// ViaNamespace records that the registry came from ns=, so the response echoes
	// OCI-Namespace as the distribution spec asks.
	ViaNamespace bool
	// Query is the client's query minus ns, passed to the origin for tags and referrers
	// (n, last, artifactType).
	Query url.Values
}

// Error is a client error with the distribution error code that describes it.
type Error struct {
	Code    string // NAME_INVALID, MANIFEST_UNKNOWN (a reference that cannot be a tag), DIGEST_INVALID, UNSUPPORTED, NAME_UNKNOWN, BLOB_UPLOAD_UNKNOWN
	Message string
}

func (e *Error) Error() string { return e.Code + ": " + e.Message }

// Status is the HTTP status a routing error is answered with: 404 for paths the API does
// not have and for manifest references that cannot be a tag (no manifest has such a
// name: distribution answers 404, and the distribution spec's conformance suite wants
// it), 400 for every other malformed part.
func (e *Error) Status() int {
	switch e.Code {
	case "UNSUPPORTED", "MANIFEST_UNKNOWN", "BLOB_UPLOAD_UNKNOWN":
		return http.StatusNotFound
	}
	return http.StatusBadRequest
}

// InvalidParameter classifies every routing error as errdefs' invalid argument: it is
// the client's request that is wrong.
func (e *Error) InvalidParameter() {}

func errf(code, format string, args ...any) error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Limits that keep hostile input small. The name limit is the grammar's own.
const (
	maxPathLen  = 1024
	maxQueryLen = 2048
	maxTagLen   = 128
)

// Router parses requests. The zero value routes unqualified names to Docker Hub.
type Router struct {
	// DefaultRegistry receives requests that name no registry. Empty means docker.io.
	DefaultRegistry string
}

// Parse validates and routes one request path and raw query.
func (rt Router) Parse(path, rawQuery string) (*Request, error) {
	if len(path) > maxPathLen {
		return nil, errf("NAME_INVALID", "request path longer than %d bytes", maxPathLen)
	}
	if len(rawQuery) > maxQueryLen {
		return nil, errf("UNSUPPORTED", "query string longer than %d bytes", maxQueryLen)
	}
	query, err := url.ParseQuery(rawQuery)
	if err != nil {
		return nil, errf("UNSUPPORTED", "malformed query string")
	}
	ns := query.Get("ns")
	for _, v := range query["ns"] {
		// containerd adds ns= to the upload URL a mirror gave it, which already names
		// it: the same value twice is one namespace.
		if v != ns {
			return nil, errf("UNSUPPORTED", "more than one ns parameter")
		}
	}
	query.Del("ns")

	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		if path == "/v2" {
			rest = ""
		} else {
			return nil, errf("UNSUPPORTED", "not a distribution API path")
		}
	}
	if rest == "" {
		req := &Request{Kind: KindPing, Query: query}
		if ns != "" {
			host, err := NormalizeHost(ns)
			if err != nil {
				return nil, err
			}
			req.Registry, req.ViaNamespace = host, true
		}
		return req, nil
	}
	// Paths are matched on their raw form: no cleaning, so ".." or "//" cannot smuggle a
	// different repository past the grammar; the grammar rejects them outright.
	segs := strings.Split(rest, "/")
	req := &Request{Query: query}
	var name string
	n := len(segs)
	switch {
	case n >= 3 && segs[n-2] == "tags" && segs[n-1] == "list":
		req.Kind, name = KindTags, strings.Join(segs[:n-2], "/")
	case n >= 3 && segs[n-2] == "manifests":
		req.Kind, name = KindManifest, strings.Join(segs[:n-2], "/")
		if err := req.setManifestRef(segs[n-1]); err != nil {
			return nil, err
		}
	case n >= 4 && segs[n-3] == "blobs" && segs[n-2] == "uploads":
		req.Kind, name = KindUpload, strings.Join(segs[:n-3], "/")
		if segs[n-1] != "" && !validHandle(segs[n-1]) {
			return nil, errf("BLOB_UPLOAD_UNKNOWN", "invalid upload handle")
		}
		req.Upload = segs[n-1]
	case n >= 3 && segs[n-2] == "blobs":
		req.Kind, name = KindBlob, strings.Join(segs[:n-2], "/")
		d, err := ParseDigest(segs[n-1])
		if err != nil {
			return nil, err
		}
		req.Digest = d
	case n >= 3 && segs[n-2] == "referrers":
		req.Kind, name = KindReferrers, strings.Join(segs[:n-2], "/")
		d, err := ParseDigest(segs[n-1])
		if err != nil {
			return nil, err
		}
		req.Digest = d
	default:
		return nil, errf("UNSUPPORTED", "unsupported distribution API path")
	}

	req.Name = name
	if ns != "" {
		host, err := NormalizeHost(ns)
		if err != nil {
			return nil, err
		}
		req.Registry, req.ViaNamespace = host, true
		if req.Repository, err = repository(host, name); err != nil {
			return nil, err
		}
	} else if req.Registry, req.Repository, err = rt.SplitName(name); err != nil {
		return nil, err
	}
	return req, nil
}

// SplitName routes a repository name written without ns=: a registry host is taken off
// the front when the first element looks like one (has a dot or a port, or is
// localhost), as docker's reference grammar does; otherwise the name belongs to the
// default registry. The repository is validated and, for Docker Hub, completed.
func (rt Router) SplitName(name string) (registry, repo string, err error) {
	registry = rt.DefaultRegistry
	if registry == "" {
		registry = DockerHub
	}
	first, remainder, found := strings.Cut(name, "/")
	if found && (strings.ContainsAny(first, ".:") || first == "localhost" || strings.HasPrefix(first, "[")) {
		if registry, err = NormalizeHost(first); err != nil {
			return "", "", err
		}
		name = remainder
	}
	if repo, err = repository(registry, name); err != nil {
		return "", "", err
	}
	return registry, repo, nil
}

// repository validates name as a repository of registry, adding Docker Hub's library/
// to its one-element names (where its official images live).
func repository(registry, name string) (string, error) {
	if registry == DockerHub && name != "" && !strings.Contains(name, "/") {
		name = "library/" + name
	}
	if err := ValidateRepository(name); err != nil {
		return "", err
	}
	return name, nil
}

func (req *Request) setManifestRef(ref string) error {
	if strings.Contains(ref, ":") {
		d, err := ParseDigest(ref)
		if err != nil {
			return err
		}
		req.Digest = d
		return nil
	}
	return req.setTag(ref)
}

var errTagGrammar = errors.New("tag must match [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")

func (req *Request) setTag(tag string) error {
	if tag == "" || len(tag) > maxTagLen {
		return errf("MANIFEST_UNKNOWN", "%v", errTagGrammar)
	}
	named, err := reference.WithName("x")
	if err != nil {
		return err
	}
	if _, err := reference.WithTag(named, tag); err != nil {
		return errf("MANIFEST_UNKNOWN", "%v", errTagGrammar)
	}
	req.Tag = tag
	return nil
}

// MaxHandleLen bounds an upload handle.
const MaxHandleLen = 64

// validHandle checks an upload handle's grammar: [A-Za-z0-9_-]{1,64}.
func validHandle(h string) bool {
	if h == "" || len(h) > MaxHandleLen {
		return false
	}
	for _, c := range h {
		if !(c == '_' || c == '-' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// ParseDigest validates a digest: a registered algorithm and an encoded part of exactly
// the right length and alphabet.
func ParseDigest(s string) (digest.Digest, error) {
	d, err := digest.Parse(s)
	if err != nil {
		return "", errf("DIGEST_INVALID", "invalid digest %q: %v", truncate(s), err)
	}
	return d, nil
}

// ValidateRepository checks a repository path against the distribution name grammar
// (lower-case path components, at most 255 characters).
func ValidateRepository(repo string) error {
	if repo == "" {
		return errf("NAME_INVALID", "empty repository name")
	}
	if len(repo) > reference.RepositoryNameTotalLengthMax {
		return errf("NAME_INVALID", "repository name longer than %d characters", reference.RepositoryNameTotalLengthMax)
	}
	// Under a fixed domain, the grammar cannot read the first component as a host (it
	// would accept "Team/app" as domain "Team"): every component must be a path component.
	named, err := reference.WithName("cove.invalid/" + repo)
	if err != nil {
		return errf("NAME_INVALID", "invalid repository name %q", truncate(repo))
	}
	if reference.Path(named) != repo {
		return errf("NAME_INVALID", "invalid repository name %q", truncate(repo))
	}
	return nil
}

// NormalizeHost validates a registry host[:port] and returns its canonical form: Docker
// Hub's aliases become docker.io, and host names are lower-cased.
func NormalizeHost(host string) (string, error) {
	if host == "" || len(host) > 255 {
		return "", errf("NAME_INVALID", "invalid registry host")
	}
	lower := strings.ToLower(host)
	named, err := reference.WithName(lower + "/x")
	if err != nil || reference.Domain(named) != lower {
		return "", errf("NAME_INVALID", "invalid registry host %q", truncate(host))
	}
	if _, port, err := net.SplitHostPort(lower); err == nil {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return "", errf("NAME_INVALID", "invalid port in registry host %q", truncate(host))
		}
	}
	switch lower {
	case "docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		return DockerHub, nil
	}
	return lower, nil
}

// APIHost is the host that serves the distribution API for a canonical registry name.
func APIHost(registry string) string {
	if registry == DockerHub {
		return DockerHubAPIHost
	}
	return registry
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}
