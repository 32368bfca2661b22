package server_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/internal/peers"
)

// pushBlob uploads b to registryAddr/repo (plain HTTP, anonymous) and returns its
// descriptor with mediaType.
func pushBlob(t *testing.T, registryAddr, repo, mediaType string, b []byte, annotations map[string]string) ocispec.Descriptor {
	t.Helper()
	r, err := name.NewRepository(registryAddr+"/"+repo, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteLayer(r, static.NewLayer(b, types.MediaType(mediaType))); err != nil {
		t.Fatalf("push blob: %v", err)
	}
	return ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b)), Annotations: annotations}
}

// pushJSON pushes v as a manifest of mediaType under repoAndTag and returns its descriptor.
func pushJSON(t *testing.T, registryAddr, repoAndTag, mediaType string, v any) ocispec.Descriptor {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	d := putManifest(t, registryAddr, repoAndTag, types.MediaType(mediaType), b, "", "")
	return ocispec.Descriptor{MediaType: mediaType, Digest: digest.Digest(d), Size: int64(len(b))}
}

// sameBytes GETs and HEADs path at the origin and through c: status, body, digest,
// Content-Type and Content-Length must be the origin's.
func sameBytes(t *testing.T, c *cache, originAddr, path string) {
	t.Helper()
	hdr := map[string]string{"Accept": acceptManifests}
	for _, method := range []string{http.MethodGet, http.MethodHead} {
		direct, want, err := do(t, method, "http://"+originAddr+path, hdr)
		if err != nil {
			t.Fatal(err)
		}
		via, got, err := do(t, method, c.url(originAddr, path), hdr)
		if err != nil {
			t.Fatal(err)
		}
		if direct.StatusCode != 200 || via.StatusCode != 200 || !bytes.Equal(got, want) {
			t.Fatalf("%s %s: origin %d (%d bytes), cove-cache %d (%d bytes)", method, path, direct.StatusCode, len(want), via.StatusCode, len(got))
		}
		for _, h := range []string{"Content-Type", "Docker-Content-Digest", "Content-Length"} {
			if direct.Header.Get(h) != via.Header.Get(h) {
				t.Errorf("%s %s: %s = %q through cove-cache, %q at the origin", method, path, h, via.Header.Get(h), direct.Header.Get(h))
			}
		}
	}
}

// OCI artifacts through cove-cache, cold and warm: a manifest with a custom config media
// type and custom layer media types, an artifactType manifest (empty config), an index
// with an artifactType, and an artifact with a subject. Every manifest (by tag and by
// digest) and blob comes back with the origin's bytes, digest and Content-Type; the warm
// pass costs the origin no blob GET; oras pulls the files through cove-cache.
func TestArtifactsThroughCache(t *testing.T) {
	o := peers.StartRegistry(t)
	const repo = "team/model"
	custom := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: pushBlob(t, o.Addr, repo, "application/vnd.cove.test.config.v1+json", []byte(`{"cove":"config"}`), nil),
		Layers: []ocispec.Descriptor{
			pushBlob(t, o.Addr, repo, "application/vnd.cove.test.layer.v1.tar", randomBytes(t, 96<<10), nil),
			pushBlob(t, o.Addr, repo, "application/x-cove-weights+zstd", randomBytes(t, 64<<10), nil),
		},
	}
	weights := randomBytes(t, 128<<10)
	model := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		ArtifactType: "application/vnd.cove.test.model",
		Config:       pushBlob(t, o.Addr, repo, ocispec.MediaTypeEmptyJSON, []byte("{}"), nil),
		Layers: []ocispec.Descriptor{pushBlob(t, o.Addr, repo, "application/vnd.cove.test.weights", weights,
			map[string]string{ocispec.AnnotationTitle: "weights.bin"})},
		Annotations: map[string]string{"org.cove.test": "model"},
	}
	customDesc := pushJSON(t, o.Addr, repo+":custom", ocispec.MediaTypeImageManifest, custom)
	modelDesc := pushJSON(t, o.Addr, repo+":model", ocispec.MediaTypeImageManifest, model)
	customDesc.ArtifactType = "application/vnd.cove.test.config.v1+json"
	modelDesc.ArtifactType = model.ArtifactType
	index := ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex,
		ArtifactType: "application/vnd.cove.test.bundle",
		Manifests:    []ocispec.Descriptor{customDesc, modelDesc},
	}
	indexDesc := pushJSON(t, o.Addr, repo+":bundle", ocispec.MediaTypeImageIndex, index)
	signed := model
	signed.ArtifactType = sigType
	signed.Subject = &ocispec.Descriptor{MediaType: modelDesc.MediaType, Digest: modelDesc.Digest, Size: modelDesc.Size}
	signed.Annotations = map[string]string{"org.cove.test": "signature"}
	signedDesc := pushJSON(t, o.Addr, repo+":signature", ocispec.MediaTypeImageManifest, signed)

	c := newCache(t, o.Addr)
	paths := []string{}
	for tag, d := range map[string]ocispec.Descriptor{"custom": customDesc, "model": modelDesc, "bundle": indexDesc, "signature": signedDesc} {
		paths = append(paths, "/v2/"+repo+"/manifests/"+tag, "/v2/"+repo+"/manifests/"+d.Digest.String())
	}
	blobs := append([]ocispec.Descriptor{custom.Config, model.Config, model.Layers[0]}, custom.Layers...)
	for _, b := range blobs {
		paths = append(paths, "/v2/"+repo+"/blobs/"+b.Digest.String())
	}
	for _, p := range paths { // cold
		sameBytes(t, c, o.Addr, p)
	}
	c.settle(t)
	viaCache := 0
	for _, r := range o.Requests() {
		if strings.HasPrefix(r.UserAgent, "cove-cache") && r.Method == http.MethodGet && strings.Contains(r.Path, "/blobs/") {
			viaCache++
		}
	}
	if viaCache != len(blobs) {
		t.Fatalf("cove-cache made %d origin blob GETs over a cold and a warm pass of %d blobs, want %d", viaCache, len(blobs), len(blobs))
	}

	// oras pulls the model through cove-cache (registry in the path): the file, and the
	// referrers list names the signature.
	alias := newAliasedCache(t, "registry.test", o.Addr, nil)
	host := strings.TrimPrefix(alias.http.URL, "http://")
	for _, pass := range []string{"cold", "warm"} {
		dir := t.TempDir()
		if out, err := peers.Oras(t, dir, "", "", "pull", host+"/registry.test/"+repo+":model"); err != nil {
			t.Fatalf("%s oras pull: %v: %s", pass, err, out)
		}
		if got, err := os.ReadFile(filepath.Join(dir, "weights.bin")); err != nil || !bytes.Equal(got, weights) {
			t.Fatalf("%s oras pull: weights.bin differs (%v)", pass, err)
		}
	}
	// go-containerregistry wrote the tag-schema index for the subject (distribution v3
	// has no referrers API): the signature is the model's referrer, through cove-cache.
	idx, _ := referrersOf(t, alias, "registry.test", repo, modelDesc.Digest.String(), sigType, nil)
	if got := referrerSet(idx); len(got) != 1 || got[signedDesc.Digest.String()] != sigType {
		t.Fatalf("referrers of the model = %v, want the signature %s", got, signedDesc.Digest)
	}
}
