package server_test

import (
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/proxy/server"
)

// apiOrigin is a registry with the referrers API for one repository (team/app), Basic
// authentication (alice only) and, when filters is set, artifactType filtering of its
// own. No registry with the referrers API is available as a test peer here (distribution
// v3 has none; zot is not served by the Go module proxy), so this origin follows the
// distribution spec's referrers section itself, and nothing else.
type apiOrigin struct {
	srv     *httptest.Server
	addr    string
	filters bool

	mu       sync.Mutex
	requests int
	index    ocispec.Index
}

func startAPIOrigin(t *testing.T, filters bool, referrers ...ocispec.Descriptor) *apiOrigin {
	o := &apiOrigin{filters: filters, index: ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: referrers}}
	o.srv = httptest.NewServer(http.HandlerFunc(o.serve))
	t.Cleanup(o.srv.Close)
	o.addr = strings.TrimPrefix(o.srv.URL, "http://")
	return o
}

func (o *apiOrigin) serve(w http.ResponseWriter, r *http.Request) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.requests++
	if r.Header.Get("Authorization") != "Basic "+base64.StdEncoding.EncodeToString([]byte("alice:alice-secret")) {
		w.Header().Set("WWW-Authenticate", `Basic realm="api-origin"`)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		w.Write([]byte(`{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`))
		return
	}
	if !strings.HasPrefix(r.URL.Path, "/v2/team/app/referrers/") {
		http.NotFound(w, r)
		return
	}
	idx := o.index
	if want := r.URL.Query().Get("artifactType"); want != "" && o.filters {
		idx.Manifests = nil
		for _, d := range o.index.Manifests {
			if d.ArtifactType == want {
				idx.Manifests = append(idx.Manifests, d)
			}
		}
		w.Header().Set("OCI-Filters-Applied", "artifactType")
	}
	b, _ := json.Marshal(idx)
	w.Header().Set("Content-Type", ocispec.MediaTypeImageIndex)
	w.Write(b)
}

func (o *apiOrigin) count() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.requests
}

func (o *apiOrigin) add(d ocispec.Descriptor) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.index.Manifests = append(o.index.Manifests, d)
}

func referrer(artifactType, content string) ocispec.Descriptor {
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: artifactType,
		Digest: digest.FromString(content), Size: int64(len(content))}
}

// An origin with the referrers API: its list is served to the credential it allows,
// kept for the referrers TTL and served again only to a credential the origin allowed in
// the repository within the allowance TTL; everyone else gets the origin's own 401, cold
// or cached. cove-cache filters by artifactType when the origin did not.
func TestReferrersFromTheAPI(t *testing.T) {
	sig, sbom := referrer(sigType, "sig"), referrer(sbomType, "sbom")
	subject := digest.FromString("subject").String()
	alice := map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:alice-secret"))}
	strangers := []map[string]string{nil, {"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:guess"))}}
	for _, filters := range []bool{true, false} {
		o := startAPIOrigin(t, filters, sig, sbom)
		c := newCacheWith(t, func(cfg *server.Config) { cfg.ReferrersTTL = 0 }, o.addr)
		refused := func(when string) {
			t.Helper()
			for _, h := range strangers {
				resp, body, err := do(t, http.MethodGet, c.url(o.addr, "/v2/team/app/referrers/"+subject), h)
				if err != nil || resp.StatusCode != 401 || resp.Header.Get("Www-Authenticate") != `Basic realm="api-origin"` ||
					strings.Contains(string(body), sig.Digest.String()) {
					t.Fatalf("%s: a credential the origin refuses got %d %q: %s", when, resp.StatusCode, resp.Header.Get("Www-Authenticate"), body)
				}
			}
		}
		refused("cold")
		idx, _ := referrersOf(t, c, o.addr, "team/app", subject, "", alice)
		if got := referrerSet(idx); len(got) != 2 || got[sig.Digest.String()] != sigType {
			t.Fatalf("referrers = %v", got)
		}
		idx, _ = referrersOf(t, c, o.addr, "team/app", subject, sbomType, alice)
		if got := referrerSet(idx); len(got) != 1 || got[sbom.Digest.String()] != sbomType {
			t.Fatalf("filters=%v: referrers filtered by %s = %v", filters, sbomType, got)
		}
		refused("cached")
		// Warm: alice's allowance and the lists are fresh; the origin is not asked.
		n := o.count()
		referrersOf(t, c, o.addr, "team/app", subject, "", alice)
		referrersOf(t, c, o.addr, "team/app", subject, sbomType, alice)
		if o.count() != n {
			t.Fatalf("warm referrers requests cost the origin %d requests", o.count()-n)
		}
	}

	// With no allowance reuse, every request asks the origin: a new referrer is seen at once.
	o := startAPIOrigin(t, true, sig)
	c := newCacheWith(t, func(cfg *server.Config) { cfg.AuthzTTL = -1 }, o.addr)
	referrersOf(t, c, o.addr, "team/app", subject, "", alice)
	o.add(sbom)
	if idx, _ := referrersOf(t, c, o.addr, "team/app", subject, "", alice); len(idx.Manifests) != 2 {
		t.Fatalf("a referrer added at the origin is not seen with --authz-ttl 0: %v", referrerSet(idx))
	}
}
