package server_test

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/internal/peers"
)

var orasDigest = regexp.MustCompile(`(?m)^Digest: (sha256:[0-9a-f]{64})$`)

// `oras push` of an OCI artifact (custom artifactType and layer media types) through
// cove-cache, registry in the path, logged in through the token broker: the origin holds
// the artifact byte-identical, and `oras pull` through cove-cache gets the files back
// without an origin blob GET.
func TestOrasPushThroughCache(t *testing.T) {
	o := peers.StartTokenOrigin(t, tenantPasswords)
	c := newAliasedCache(t, "registry.test", o.Addr, nil)
	host := strings.TrimPrefix(c.http.URL, "http://")
	dir := t.TempDir()
	files := map[string][]byte{"model.bin": randomBytes(t, 3<<20), "config.json": []byte(`{"name":"cove"}`)}
	for n, b := range files {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ref := host + "/registry.test/team-a/model:v1"
	user, pw := "registry.test/team-a", tenantPasswords["team-a"]
	out, err := peers.Oras(t, dir, user, pw, "push", "--artifact-type", "application/vnd.cove.test.model",
		ref, "model.bin:application/vnd.cove.test.weights", "config.json:application/vnd.cove.test.config+json")
	if err != nil {
		t.Fatalf("oras push through the cache: %v: %s", err, out)
	}
	m := orasDigest.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("oras push printed no digest: %s", out)
	}
	d := m[1]

	// Straight at the origin: the manifest and every blob, byte-identical.
	hdr := tokenHeader(t, o, peers.TokenAdmin, "repository:team-a/model:pull")
	_, body := mustGet(t, o.URL+"/v2/team-a/model/manifests/v1", hdr, 200)
	if sha(body) != d {
		t.Fatalf("the origin's team-a/model:v1 is %s, pushed %s", sha(body), d)
	}
	var man ocispec.Manifest
	if err := json.Unmarshal(body, &man); err != nil || man.ArtifactType != "application/vnd.cove.test.model" || len(man.Layers) != 2 {
		t.Fatalf("the origin's manifest: %s (%v)", body, err)
	}
	for _, l := range man.Layers {
		if _, got := mustGet(t, o.URL+"/v2/team-a/model/blobs/"+l.Digest.String(), hdr, 200); !bytes.Equal(got, files[l.Annotations[ocispec.AnnotationTitle]]) {
			t.Fatalf("the origin's %s (%s) differs from the file pushed", l.Digest, l.Annotations[ocispec.AnnotationTitle])
		}
	}
	c.settle(t)

	// oras pull through the cache: the files, and no blob from the origin.
	before := o.BlobGETs()
	into := t.TempDir()
	if out, err := peers.Oras(t, into, user, pw, "pull", ref); err != nil {
		t.Fatalf("oras pull through the cache: %v: %s", err, out)
	}
	for n, b := range files {
		if got, err := os.ReadFile(filepath.Join(into, n)); err != nil || !bytes.Equal(got, b) {
			t.Fatalf("%s pulled through the cache: %v", n, err)
		}
	}
	after := o.BlobGETs()
	for _, l := range append([]ocispec.Descriptor{man.Config}, man.Layers...) {
		if after[l.Digest.String()] != before[l.Digest.String()] {
			t.Errorf("%s was fetched from the origin by a pull after the push", l.Digest)
		}
	}
}
