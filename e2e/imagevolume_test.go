package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

// Kubernetes image volumes: the kubelet pulls the volume's reference with CRI PullImage,
// as it pulls a container image, and containerd mounts what it unpacked. An OCI
// artifact pushed with oras-go goes to the origin; two nodes (containerd whose _default
// mirror is cove-node, in front of cove-cache) pull it through CRI. The first fills
// cove-cache, the second costs the origin no blob GET, and both hold the pushed bytes.
//
// containerd v2.3.4 accepts both shapes at PullImage, on both of CRI's pull paths (the
// transfer service, and its own client-side pull), and the CRI image ID is the config
// digest. What a volume shows differs, and ctr image mount takes the steps CRI takes for
// an image volume (Unpack, RootFS, a snapshot of the chain ID, mount: mutateImageMount in
// internal/cri/server/container_image_mount.go):
//   - "model": artifactType, the empty config, the file as a raw layer of its own media
//     type. Pulled, and the layer is in the content store, but unpack skips layers whose
//     media type is not a layer type (images.IsLayerType), so the volume is empty.
//   - "mountable": artifactType, an image config whose rootfs lists the layer, the file
//     in a tar layer. The volume holds the file.
func TestImageVolumeArtifactThroughCRI(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	const size = 8 << 20
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)

	for i, tc := range []struct {
		name      string
		push      func(t testing.TB, ctx context.Context, addr, repo, tag string, size int64, seed uint64) pushedArtifact
		mountable bool
		opts      []peers.ContainerdOption // CRI's pull path: the transfer service by default
	}{
		{name: "model", push: pushModelArtifact},
		{name: "mountable", push: pushMountableModelArtifact, mountable: true},
		{name: "model-local-pull", push: pushModelArtifact, opts: []peers.ContainerdOption{peers.WithCRILocalPull()}},
		{name: "mountable-local-pull", push: pushMountableModelArtifact, mountable: true, opts: []peers.ContainerdOption{peers.WithCRILocalPull()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := tc.push(t, ctx, origin.Addr, "ml/"+tc.name, "v1", size, uint64(i))
			blobs := a.Fetched()
			from := len(origin.Requests())
			misses0 := cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="miss"`)
			first := criPullThroughNode(t, ctx, cove, origin, a, tc.opts...)
			var fills []string
			for _, q := range origin.Requests()[from:] {
				if q.Method == "GET" && strings.Contains(q.Path, "/blobs/") {
					if !strings.Contains(q.UserAgent, "cove-cache") {
						t.Errorf("origin blob GET %s by %q: the pull went round cove-cache", q.Path, q.UserAgent)
					}
					fills = append(fills, q.Path[strings.LastIndex(q.Path, "/")+1:])
				}
			}
			if len(fills) != len(blobs) || !sameSet(fills, blobs) {
				t.Fatalf("origin blob GETs for the first pull: %v, want one of each of %v", fills, blobs)
			}
			if n := cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="miss"`) - misses0; n != float64(len(blobs)) {
				t.Fatalf("cove-cache blob misses for the first pull = %v, want %d", n, len(blobs))
			}

			gets := origin.BlobGETs()
			hits0 := cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="hit"`)
			second := criPullThroughNode(t, ctx, cove, origin, a, tc.opts...)
			for _, d := range blobs {
				if n := origin.BlobGETs()[d] - gets[d]; n != 0 {
					t.Errorf("the second node's pull made %d origin GETs of %s, want 0", n, d)
				}
			}
			if n := cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="hit"`) - hits0; n < float64(len(blobs)) {
				t.Errorf("cove-cache blob hits for the second pull = %v, want at least %d", n, len(blobs))
			}

			for i, c := range []*peers.Containerd{first, second} {
				vol := mountImageVolume(t, ctx, c, a.Ref)
				got, err := fileDigest(filepath.Join(vol, "model.bin"))
				switch {
				case tc.mountable && (err != nil || got != a.File):
					t.Errorf("node %d: the volume's model.bin: digest %s, error %v; want %s", i, got, err, a.File)
				case !tc.mountable && !os.IsNotExist(err):
					t.Errorf("node %d: the volume of a raw-layer artifact holds model.bin (digest %s, error %v): containerd now unpacks such layers, update the docs", i, got, err)
				}
			}
		})
	}
}

// criPullThroughNode pulls a with CRI PullImage (as the kubelet does for an image
// volume, without credentials) on a fresh containerd whose _default mirror is a fresh
// cove-node in front of cove: a new node of the cluster. It checks what CRI answered and
// that containerd's content store holds the pushed manifest, config and layer bytes.
func criPullThroughNode(t *testing.T, ctx context.Context, cove *peers.Cove, origin *peers.Registry, a pushedArtifact, opts ...peers.ContainerdOption) *peers.Containerd {
	t.Helper()
	node := peers.StartCoveNode(t, []string{cove.URL}, "--origin-plain-http", origin.Addr)
	c := peers.StartContainerd(t, append([]peers.ContainerdOption{peers.WithMirror(node.URL)}, opts...)...)
	id, err := c.CRIPull(ctx, a.Ref, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The CRI image ID is the config's digest: every artifact over the empty config has
	// the same one (crictl images lists them under one ID).
	if id != a.Config.Digest.String() {
		t.Errorf("CRI image ID %s, want the config digest %s", id, a.Config.Digest)
	}
	target, err := c.ImageTarget(ctx, a.Ref)
	if err != nil {
		t.Fatal(err)
	}
	if target != a.Manifest.Digest.String() {
		t.Fatalf("containerd recorded %s for %s, pushed %s", target, a.Ref, a.Manifest.Digest)
	}
	for _, d := range []digest.Digest{a.Manifest.Digest, a.Config.Digest, a.Layer.Digest} {
		got, err := fileDigest(filepath.Join(c.Root, "io.containerd.content.v1.content", "blobs", "sha256", d.Encoded()))
		if err != nil || got != d {
			t.Errorf("containerd's content store: %s has digest %s, error %v", d, got, err)
		}
	}
	return c
}

// mountImageVolume mounts ref read-only on a new directory with `ctr image mount`: the
// steps CRI takes for an image volume. It unmounts it at cleanup.
func mountImageVolume(t *testing.T, ctx context.Context, c *peers.Containerd, ref string) string {
	t.Helper()
	target := t.TempDir()
	ctr := func(args ...string) ([]byte, error) {
		cmd := exec.CommandContext(ctx, peers.Bin(t, "ctr"), append([]string{"-a", c.Address, "-n", peers.Namespace}, args...)...)
		return cmd.CombinedOutput()
	}
	if out, err := ctr("image", "mount", ref, target); err != nil {
		t.Fatalf("ctr image mount %s: %v\n%s", ref, err, out)
	}
	t.Cleanup(func() {
		if out, err := ctr("image", "unmount", target); err != nil {
			t.Logf("ctr image unmount: %v\n%s", err, out)
			_ = syscall.Unmount(target, syscall.MNT_DETACH)
		}
	})
	return target
}

// sameSet reports whether a and b hold the same strings, each as often.
func sameSet(a, b []string) bool {
	n := map[string]int{}
	for _, s := range a {
		n[s]++
	}
	for _, s := range b {
		n[s]--
	}
	for _, v := range n {
		if v != 0 {
			return false
		}
	}
	return true
}
