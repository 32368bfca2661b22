package peers

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Image describes a test image as pushed, so tests can check what containerd and the
// registries did with each blob.
type Image struct {
	Ref    string   // registryAddr/repo:tag, e.g. 127.0.0.1:5000/team/app:v1
	Digest string   // manifest digest (the target containerd records)
	Layers []string // layer digests, base first
	Config string   // config blob digest
	Size   int64    // sum of the compressed layer sizes: the bulk of what a pull downloads
}

// PushRandomImage builds a linux image for this machine's architecture (OCI manifest)
// with the given number of layers and pushes it to the plain-HTTP registry at
// registryAddr as repoAndTag (e.g. "team/app:v1"). Each layer is a real gzip tar
// holding one file of layerSize random bytes, so containerd can unpack it and, the
// content being incompressible, the bytes on the wire are really about layerSize.
// The gzip stream uses stored (uncompressed) deflate blocks: valid for every
// decompressor, and it keeps large benchmark images cheap to build.
func PushRandomImage(t testing.TB, registryAddr, repoAndTag string, layers int, layerSize int64, opts ...PushOption) Image {
	t.Helper()
	if layers < 1 {
		t.Fatalf("peers: PushRandomImage needs at least one layer")
	}
	return pushImage(t, t.TempDir(), registryAddr, repoAndTag, "/bin/true", nil, layers, layerSize, opts)
}

// pushImage builds an image for linux on this machine's architecture with cmd as its
// Cmd, the given first layers, then `layers` random layers of layerSize, and pushes it.
func pushImage(t testing.TB, dir, registryAddr, repoAndTag, cmd string, first []*fileLayer, layers int, layerSize int64, opts []PushOption) Image {
	t.Helper()
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.ConfigFile(img, &v1.ConfigFile{
		OS:           "linux",
		Architecture: runtime.GOARCH,
		Created:      v1.Time{Time: time.Now().UTC().Truncate(time.Second)},
		Config:       v1.Config{Cmd: []string{cmd}},
		RootFS:       v1.RootFS{Type: "layers"},
	})
	if err != nil {
		t.Fatalf("peers: config: %v", err)
	}
	out := Image{Ref: registryAddr + "/" + repoAndTag}
	all := append([]*fileLayer(nil), first...)
	for i := range layers {
		l, err := writeRandomLayer(filepath.Join(dir, fmt.Sprintf("layer-%d.tar.gz", i)), fmt.Sprintf("cove/layer-%d.bin", i), layerSize)
		if err != nil {
			t.Fatalf("peers: layer %d: %v", i, err)
		}
		all = append(all, l)
	}
	for i, l := range all {
		img, err = mutate.Append(img, mutate.Addendum{Layer: l, MediaType: types.OCILayer})
		if err != nil {
			t.Fatalf("peers: append layer %d: %v", i, err)
		}
		out.Layers = append(out.Layers, l.digest.String())
		out.Size += l.size
	}
	ref, err := name.ParseReference(out.Ref, name.Insecure)
	if err != nil {
		t.Fatalf("peers: reference %q: %v", out.Ref, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ropts := []remote.Option{remote.WithContext(ctx)}
	for _, o := range opts {
		ropts = append(ropts, o.remote)
	}
	if err := remote.Write(ref, img, ropts...); err != nil {
		t.Fatalf("peers: push %s: %v", out.Ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatalf("peers: %v", err)
	}
	c, err := img.ConfigName()
	if err != nil {
		t.Fatalf("peers: %v", err)
	}
	out.Digest, out.Config = d.String(), c.String()
	return out
}

// PushOption configures PushRandomImage.
type PushOption struct{ remote remote.Option }

// WithPushAuth pushes with HTTP basic credentials (for WithHtpasswd registries).
func WithPushAuth(user, password string) PushOption {
	return PushOption{remote: remote.WithAuth(&authn.Basic{Username: user, Password: password})}
}

// fileLayer is a gzip tar layer stored in a file, with digests computed while writing.
type fileLayer struct {
	path   string
	digest v1.Hash // of the gzip stream
	diffID v1.Hash // of the tar stream
	size   int64
}

func (l *fileLayer) Digest() (v1.Hash, error)             { return l.digest, nil }
func (l *fileLayer) DiffID() (v1.Hash, error)             { return l.diffID, nil }
func (l *fileLayer) Size() (int64, error)                 { return l.size, nil }
func (l *fileLayer) MediaType() (types.MediaType, error)  { return types.OCILayer, nil }
func (l *fileLayer) Compressed() (io.ReadCloser, error)   { return os.Open(l.path) }
func (l *fileLayer) Uncompressed() (io.ReadCloser, error) { return gunzipFile(l.path) }

func gunzipFile(path string) (io.ReadCloser, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	zr, err := gzip.NewReader(bufio.NewReader(f))
	if err != nil {
		f.Close()
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{zr, f}, nil
}

// countingHash counts and hashes what passes through it.
type countingHash struct {
	h hash.Hash
	n int64
}

func (c *countingHash) Write(p []byte) (int, error) {
	c.h.Write(p)
	c.n += int64(len(p))
	return len(p), nil
}

func (c *countingHash) sum() v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(c.h.Sum(nil))}
}

func writeRandomLayer(path, member string, size int64) (*fileLayer, error) {
	return writeLayer(path, gzip.NoCompression, func(tw *tar.Writer) error {
		if err := tw.WriteHeader(&tar.Header{
			Typeflag: tar.TypeDir, Name: filepath.Dir(member) + "/", Mode: 0o755,
			ModTime: time.Unix(0, 0),
		}); err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{
			Typeflag: tar.TypeReg, Name: member, Mode: 0o644, Size: size,
			ModTime: time.Unix(0, 0),
		}); err != nil {
			return err
		}
		var seed [32]byte
		if _, err := crand.Read(seed[:]); err != nil {
			return err
		}
		_, err := io.CopyN(tw, rand.NewChaCha8(seed), size)
		return err
	})
}

// writeLayer writes a gzip tar layer at path whose entries fill writes, computing the
// layer's digest (compressed) and diff ID (uncompressed) on the way.
func writeLayer(path string, gzipLevel int, fill func(tw *tar.Writer) error) (*fileLayer, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	bw := bufio.NewWriterSize(f, 1<<20)
	gzSum := &countingHash{h: sha256.New()}
	zw, err := gzip.NewWriterLevel(io.MultiWriter(bw, gzSum), gzipLevel)
	if err != nil {
		return nil, err
	}
	tarSum := &countingHash{h: sha256.New()}
	tw := tar.NewWriter(io.MultiWriter(zw, tarSum))
	if err := fill(tw); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	return &fileLayer{path: path, digest: gzSum.sum(), diffID: tarSum.sum(), size: gzSum.n}, nil
}
