package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"encoding/json"
	"io"
	"runtime"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry/remote"
)

// Media types of the test artifacts: a model the way AI tooling ships one, a file in a
// layer of its own media type, and the artifact type naming what the whole thing is.
const (
	modelArtifactType = "application/vnd.cove.model.v1"
	modelLayerType    = "application/vnd.cove.model.weights.v1"
)

// pushedArtifact is an OCI artifact as pushed to the origin.
type pushedArtifact struct {
	Ref      string // registry/repo:tag
	Manifest ocispec.Descriptor
	Config   ocispec.Descriptor
	Layer    ocispec.Descriptor
	// File is the digest of the model file itself: the layer's for a raw layer, the tar
	// member's for a tar layer.
	File digest.Digest
}

// Blobs lists the artifact's blobs: config and layer.
func (a pushedArtifact) Blobs() []string {
	return []string{a.Config.Digest.String(), a.Layer.Digest.String()}
}

// Fetched lists the blobs containerd downloads: oras-go embeds the empty config ({}) in
// the manifest as data, and containerd writes embedded data to its content store without
// asking any registry (core/remotes/handlers.go, fetch).
func (a pushedArtifact) Fetched() []string {
	var out []string
	for _, d := range []ocispec.Descriptor{a.Config, a.Layer} {
		if int64(len(d.Data)) != d.Size {
			out = append(out, d.Digest.String())
		}
	}
	return out
}

// originRepo is an oras-go client of repo on the plain-HTTP registry at addr.
func originRepo(t testing.TB, addr, repo string) *remote.Repository {
	t.Helper()
	r, err := remote.NewRepository(addr + "/" + repo)
	if err != nil {
		t.Fatal(err)
	}
	r.PlainHTTP = true
	return r
}

// pseudoRandom is a deterministic stream of size incompressible bytes: the same seed
// gives the same bytes, so a blob of any size can be read twice (hashed, then pushed)
// without being held in memory or written to disk. It is AES-CTR keyed by the seed over
// zeros: about 2 GB/s on one core with AES-NI, race detector or not (ChaCha8 from
// math/rand/v2 gives 250 MB/s, half that under -race: a minute per pass of 4 GiB).
func pseudoRandom(seed uint64, size int64) io.Reader {
	var key [16]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	block, err := aes.NewCipher(key[:])
	if err != nil {
		panic(err) // a 16-byte key is always valid
	}
	return io.LimitReader(cipher.StreamReader{S: cipher.NewCTR(block, make([]byte, aes.BlockSize)), R: zeros{}}, size)
}

// zeros reads as an endless run of zero bytes.
type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// pushRandomBlob pushes size pseudo-random bytes from seed as a blob of mediaType with
// oras-go (one monolithic upload streamed from the generator) and returns its descriptor.
func pushRandomBlob(t testing.TB, ctx context.Context, repo *remote.Repository, mediaType string, size int64, seed uint64) ocispec.Descriptor {
	t.Helper()
	dg := digest.SHA256.Digester()
	if _, err := io.CopyBuffer(dg.Hash(), pseudoRandom(seed, size), make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: dg.Digest(), Size: size}
	if err := repo.Push(ctx, desc, pseudoRandom(seed, size)); err != nil {
		t.Fatalf("push a %d-byte blob: %v", size, err)
	}
	return desc
}

// pushBytes pushes b as a blob of mediaType and returns its descriptor.
func pushBytes(t testing.TB, ctx context.Context, repo *remote.Repository, mediaType string, b []byte) ocispec.Descriptor {
	t.Helper()
	desc := content.NewDescriptorFromBytes(mediaType, b)
	if err := repo.Push(ctx, desc, bytes.NewReader(b)); err != nil {
		t.Fatalf("push %s: %v", mediaType, err)
	}
	return desc
}

// packArtifact pushes an OCI 1.1 manifest of artifactType over config (the empty
// descriptor when nil) and layer, tags it, and returns what was pushed. The created
// annotation is fixed, so the manifest is the same from run to run.
func packArtifact(t testing.TB, ctx context.Context, repo *remote.Repository, tag, artifactType string, config *ocispec.Descriptor, layer ocispec.Descriptor, file digest.Digest) pushedArtifact {
	t.Helper()
	m, err := oras.PackManifest(ctx, repo, oras.PackManifestVersion1_1, artifactType, oras.PackManifestOptions{
		ConfigDescriptor:    config,
		Layers:              []ocispec.Descriptor{layer},
		ManifestAnnotations: map[string]string{ocispec.AnnotationCreated: "2026-01-01T00:00:00Z"},
	})
	if err != nil {
		t.Fatalf("pack %s: %v", artifactType, err)
	}
	if err := repo.Tag(ctx, m, tag); err != nil {
		t.Fatalf("tag %s: %v", tag, err)
	}
	cfg := ocispec.DescriptorEmptyJSON
	if config != nil {
		cfg = *config
	}
	return pushedArtifact{
		Ref:      repo.Reference.Registry + "/" + repo.Reference.Repository + ":" + tag,
		Manifest: m, Config: cfg, Layer: layer, File: file,
	}
}

// pushModelArtifact pushes the shape AI tooling uses for a model (oras push, for one):
// artifactType set, the empty config ({}), the file as a raw layer of its own media type.
func pushModelArtifact(t testing.TB, ctx context.Context, addr, repoName, tag string, size int64, seed uint64) pushedArtifact {
	t.Helper()
	repo := originRepo(t, addr, repoName)
	layer := pushRandomBlob(t, ctx, repo, modelLayerType, size, seed)
	layer.Annotations = map[string]string{ocispec.AnnotationTitle: "model.bin"}
	return packArtifact(t, ctx, repo, tag, modelArtifactType, nil, layer, layer.Digest)
}

// pushMountableModelArtifact pushes the same model in the shape containerd can mount as
// a Kubernetes image volume: artifactType set, an image config whose rootfs lists the
// layer's diff ID, and the file inside an uncompressed tar layer (so the diff ID is the
// layer digest). The tar is built in memory: keep size small.
func pushMountableModelArtifact(t testing.TB, ctx context.Context, addr, repoName, tag string, size int64, seed uint64) pushedArtifact {
	t.Helper()
	file, err := io.ReadAll(pseudoRandom(seed, size))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "model.bin", Mode: 0o444, Size: size, ModTime: time.Unix(0, 0)}); err != nil {
		t.Fatal(err)
	}
	if _, err := tw.Write(file); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	repo := originRepo(t, addr, repoName)
	layer := pushBytes(t, ctx, repo, ocispec.MediaTypeImageLayer, buf.Bytes())
	cfgJSON, err := json.Marshal(ocispec.Image{
		Platform: ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{layer.Digest}},
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg := pushBytes(t, ctx, repo, ocispec.MediaTypeImageConfig, cfgJSON)
	return packArtifact(t, ctx, repo, tag, modelArtifactType, &cfg, layer, digest.FromBytes(file))
}
