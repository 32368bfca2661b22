package server_test

import (
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/server"
)

// originReferrers is the tag schema's index of subject in repo, read at the origin.
func originReferrers(t *testing.T, o *peers.Registry, repo, subject string) map[string]string {
	t.Helper()
	resp, body, err := do(t, http.MethodGet, o.URL+"/v2/"+repo+"/manifests/"+strings.Replace(subject, ":", "-", 1), map[string]string{"Accept": ocispec.MediaTypeImageIndex})
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("the origin's referrers index of %s: %v %v", subject, err, resp)
	}
	var idx ocispec.Index
	if err := json.Unmarshal(body, &idx); err != nil {
		t.Fatal(err)
	}
	return referrerSet(idx)
}

// A referrer deleted through the cache leaves its subject's referrers list, at the cache
// and at an origin without the referrers API. cove-cache answers the API for such an
// origin, so oras takes it for supported and deletes only the manifest: cove-cache takes
// it out of the tag schema's index itself. A bare DELETE (a kept referrer): the list,
// kept here for an hour, is asked of the origin again.
func TestDeleteReferrerLeavesItsSubjectsList(t *testing.T) {
	o := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, o.Addr, "team/app:v1", 1, 1024)
	sig := attach(t, "", "", o.Addr+"/team/app@"+img.Digest, sigType)
	c := newAliasedCache(t, "registry.test", o.Addr, func(cfg *server.Config) { cfg.ReferrersTTL = time.Hour })
	host := strings.TrimPrefix(c.http.URL, "http://")
	sbom := attach(t, "", "", host+"/registry.test/team/app@"+img.Digest, sbomType)
	if got := referrerSet(first(referrersOf(t, c, "registry.test", "team/app", img.Digest, "", nil))); len(got) != 2 || got[sbom] != sbomType {
		t.Fatalf("referrers = %v", got)
	}
	// peers.Oras puts its flags after the first word: a subcommand two words deep is run here.
	del := exec.CommandContext(t.Context(), peers.Bin(t, "oras"), "manifest", "delete", "--plain-http", "--force",
		"--registry-config", filepath.Join(t.TempDir(), "config.json"), host+"/registry.test/team/app@"+sbom)
	del.Env = append(os.Environ(), "HOME="+t.TempDir())
	if out, err := del.CombinedOutput(); err != nil {
		t.Fatalf("oras manifest delete through the cache: %v: %s", err, out)
	}
	if got := referrerSet(first(referrersOf(t, c, "registry.test", "team/app", img.Digest, "", nil))); len(got) != 1 || got[sig] != sigType {
		t.Fatalf("after oras deleted %s through the cache, referrers = %v", sbom, got)
	}
	if got := originReferrers(t, o, "team/app", img.Digest); len(got) != 1 || got[sig] != sigType {
		t.Fatalf("after oras deleted %s through the cache, the origin's index = %v", sbom, got)
	}

	mustGet(t, c.url("registry.test", "/v2/team/app/manifests/"+sig), acceptHeader, 200) // the referrer, kept
	schemaTag := "/manifests/sha256-"
	before := originRequests(o, schemaTag)
	referrersOf(t, c, "registry.test", "team/app", img.Digest, "", nil)
	if n := originRequests(o, schemaTag) - before; n != 0 {
		t.Fatalf("a kept referrers list asked the origin %d times", n)
	}
	resp, body := send(t, http.MethodDelete, c.url("registry.test", "/v2/team/app/manifests/"+sig), nil, nil)
	expect(t, "DELETE referrer", resp, body, http.StatusAccepted)
	if got := referrerSet(first(referrersOf(t, c, "registry.test", "team/app", img.Digest, "", nil))); len(got) != 0 {
		t.Fatalf("after deleting %s through the cache, referrers = %v", sig, got)
	}
	if got := originReferrers(t, o, "team/app", img.Digest); len(got) != 0 {
		t.Fatalf("after deleting %s through the cache, the origin's index = %v", sig, got)
	}
}

func first[A, B any](a A, _ B) A { return a }
