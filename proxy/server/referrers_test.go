package server_test

import (
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/server"
)

const (
	sigType  = "application/vnd.cove.test.signature"
	sbomType = "application/vnd.cove.test.sbom"
)

// attach pushes an artifact of artifactType referring to subject (host/repo@digest) with
// oras, as user, and returns its manifest digest.
func attach(t *testing.T, user, password, subject, artifactType string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "blob.txt"), []byte(artifactType+" of "+subject), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := peers.Oras(t, dir, user, password, "attach", "--artifact-type", artifactType, subject, "blob.txt:application/vnd.cove.test.blob")
	if err != nil {
		t.Fatalf("oras attach %s to %s: %v: %s", artifactType, subject, err, out)
	}
	m := orasDigest.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("oras attach printed no digest: %s", out)
	}
	return m[1]
}

// referrersOf GETs the referrers of subject in repo through c (ns= routing) with hdr,
// filtered by artifactType when not "", and checks the answer's form.
func referrersOf(t *testing.T, c *cache, originAddr, repo, subject, artifactType string, hdr map[string]string) (ocispec.Index, *http.Response) {
	t.Helper()
	u := c.http.URL + "/v2/" + repo + "/referrers/" + subject + "?ns=" + url.QueryEscape(originAddr)
	if artifactType != "" {
		u += "&artifactType=" + url.QueryEscape(artifactType)
	}
	resp, body := mustGet(t, u, hdr, 200)
	if ct := resp.Header.Get("Content-Type"); ct != ocispec.MediaTypeImageIndex {
		t.Fatalf("referrers Content-Type = %q", ct)
	}
	if f := resp.Header.Get("OCI-Filters-Applied"); (artifactType != "") != (f == "artifactType") {
		t.Fatalf("OCI-Filters-Applied = %q for artifactType %q", f, artifactType)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(body, &idx); err != nil || idx.SchemaVersion != 2 || idx.MediaType != ocispec.MediaTypeImageIndex || idx.Manifests == nil {
		t.Fatalf("referrers answer is not an image index with a manifests list: %s (%v)", body, err)
	}
	return idx, resp
}

func referrerSet(idx ocispec.Index) map[string]string {
	out := map[string]string{}
	for _, d := range idx.Manifests {
		out[d.Digest.String()] = d.ArtifactType
	}
	return out
}

// originRequests counts the origin's requests whose path contains part.
func originRequests(o *peers.Registry, part string) int {
	n := 0
	for _, r := range o.Requests() {
		if strings.Contains(r.Path, part) {
			n++
		}
	}
	return n
}

// An origin without the referrers API (distribution v3 answers 404): cove-cache answers
// from the tag schema (the index oras keeps under sha256-<hex>), filters by artifactType
// itself and says so, answers an empty index where nothing refers, serves the list again
// from memory within the TTL, and sees a new referrer pushed through it at once.
func TestReferrersTagSchemaFallback(t *testing.T) {
	o := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, o.Addr, "team/app:v1", 1, 1024)
	subject := o.Addr + "/team/app@" + img.Digest
	sig := attach(t, "", "", subject, sigType)
	sbom := attach(t, "", "", subject, sbomType)
	if resp, _, err := do(t, http.MethodGet, o.URL+"/v2/team/app/referrers/"+img.Digest, nil); err != nil || resp.StatusCode != 404 {
		t.Fatalf("the origin has a referrers API (%v, %v): this test needs one without", resp, err)
	}
	c := newCacheWith(t, func(cfg *server.Config) { cfg.ReferrersTTL = 0 }, o.Addr)

	idx, _ := referrersOf(t, c, o.Addr, "team/app", img.Digest, "", nil)
	if got := referrerSet(idx); len(got) != 2 || got[sig] != sigType || got[sbom] != sbomType {
		t.Fatalf("referrers = %v, want %s (%s) and %s (%s)", got, sig, sigType, sbom, sbomType)
	}
	idx, _ = referrersOf(t, c, o.Addr, "team/app", img.Digest, sigType, nil)
	if got := referrerSet(idx); len(got) != 1 || got[sig] != sigType {
		t.Fatalf("referrers filtered by %s = %v", sigType, got)
	}
	// Nothing refers to the config: an empty index, not a 404.
	if idx, _ := referrersOf(t, c, o.Addr, "team/app", img.Config, "", nil); len(idx.Manifests) != 0 {
		t.Fatalf("referrers of the config = %v", idx.Manifests)
	}

	// Warm, within the TTL: the origin is not asked.
	before := originRequests(o, "/team/app/")
	referrersOf(t, c, o.Addr, "team/app", img.Digest, "", nil)
	referrersOf(t, c, o.Addr, "team/app", img.Digest, sigType, nil)
	if n := originRequests(o, "/team/app/") - before; n != 0 {
		t.Fatalf("warm referrers requests cost the origin %d requests, want 0", n)
	}

	// A signature attached through cove-cache is listed at once.
	alias := newAliasedCache(t, "registry.test", o.Addr, nil)
	host := strings.TrimPrefix(alias.http.URL, "http://")
	idx, _ = referrersOf(t, alias, "registry.test", "team/app", img.Digest, "", nil)
	if len(idx.Manifests) != 2 {
		t.Fatalf("referrers through the aliased cache = %v", referrerSet(idx))
	}
	sig2 := attach(t, "", "", host+"/registry.test/team/app@"+img.Digest, sigType)
	idx, _ = referrersOf(t, alias, "registry.test", "team/app", img.Digest, sigType, nil)
	if got := referrerSet(idx); len(got) != 2 || got[sig2] != sigType || got[sig] != sigType {
		t.Fatalf("after attaching %s through cove-cache, referrers = %v", sig2, got)
	}
	// oras discover through cove-cache sees the same.
	out, err := peers.Oras(t, t.TempDir(), "", "", "discover", "--format", "json", host+"/registry.test/team/app@"+img.Digest)
	if err != nil || !strings.Contains(out, sig2) || !strings.Contains(out, sbom) {
		t.Fatalf("oras discover through cove-cache: %v: %s", err, out)
	}
}
