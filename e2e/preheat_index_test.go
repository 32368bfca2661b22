package e2e

import (
	"context"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/cove-oci/cove/internal/peers"
)

// pushIndex pushes a multi-platform OCI index (one small image per platform, given as
// OS/ARCH) to the plain-HTTP registry at addr and returns its reference, its digest and
// the blobs (config and layers) of each platform's image.
func pushIndex(t *testing.T, addr, repoAndTag string, plats ...string) (ref, digest string, blobs map[string][]string) {
	t.Helper()
	blobs = map[string][]string{}
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	for _, p := range plats {
		osName, arch, _ := strings.Cut(p, "/")
		img, err := random.Image(256<<10, 2)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		cf.OS, cf.Architecture = osName, arch
		cf.Config.Cmd = []string{"/bin/true"}
		if img, err = mutate.ConfigFile(img, cf); err != nil {
			t.Fatal(err)
		}
		cfgName, err := img.ConfigName()
		if err != nil {
			t.Fatal(err)
		}
		blobs[p] = append(blobs[p], cfgName.String())
		layers, err := img.Layers()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range layers {
			d, err := l.Digest()
			if err != nil {
				t.Fatal(err)
			}
			blobs[p] = append(blobs[p], d.String())
		}
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{
			Platform: &v1.Platform{OS: osName, Architecture: arch},
		}})
	}
	ref = addr + "/" + repoAndTag
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := remote.WriteIndex(r, idx, remote.WithContext(ctx)); err != nil {
		t.Fatalf("push index %s: %v", ref, err)
	}
	d, err := idx.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return ref, d.String(), blobs
}

// A multi-platform index preheated for one platform (--platform), then for all
// (--all-platforms): each time the chosen platforms' layers and every platform's
// manifest and config (the metadata containerd fetches for all platforms) are fetched
// from the origin and nothing else, and a fresh containerd pulling the same selection
// costs the origin no blob.
func TestPreheatIndexPlatforms(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	ref, digest, blobs := pushIndex(t, origin.Addr, "team/multi:v1", "linux/amd64", "linux/arm64", "linux/s390x")
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)

	// Every platform's config (containerd fetches them all as metadata), and the layers
	// of the platforms in layers, fetched once from the origin; no other layer.
	checkOrigin := func(when string, layers ...string) {
		t.Helper()
		got := origin.BlobGETs()
		for _, p := range slices.Sorted(maps.Keys(blobs)) {
			for i, d := range blobs[p] {
				want := 0
				if i == 0 || slices.Contains(layers, p) {
					want = 1
				}
				if got[d] != want {
					t.Fatalf("%s: origin GETs of %s blob %s = %d, want %d", when, p, d, got[d], want)
				}
			}
		}
	}
	pull := func(when string, args ...string) {
		t.Helper()
		before := origin.BlobGETs()
		c := peers.StartContainerd(t, peers.WithMirror(cove.URL))
		if err := c.Pull(ctx, ref, args...); err != nil {
			t.Fatal(err)
		}
		if got, err := c.ImageTarget(ctx, ref); err != nil || got != digest {
			t.Fatalf("%s: containerd's target %q (%v), want %s", when, got, err, digest)
		}
		if err := c.ReadAllContent(ctx, ref); err != nil {
			t.Fatal(err)
		}
		if d := blobGETsDiff(origin.BlobGETs(), before); len(d) > 0 {
			t.Fatalf("%s: the pull after preheat made origin blob GETs: %v", when, d)
		}
		c.Stop()
	}

	r := runPreheat(t, "--cache", cove.URL, "--platform", "linux/arm64", ref)
	t.Logf("%s", r)
	if r.code != 0 || !strings.Contains(r.stdout, "preheated "+ref+": "+digest+" (4 manifests, 5 blobs") {
		t.Fatalf("preheat --platform linux/arm64: %s", r)
	}
	checkOrigin("after --platform linux/arm64", "linux/arm64")
	pull("ctr pull --platform linux/arm64", "--platform", "linux/arm64")

	r = runPreheat(t, "--cache", cove.URL, "--all-platforms", ref)
	t.Logf("%s", r)
	if r.code != 0 || !strings.Contains(r.stdout, "(4 manifests, 9 blobs") {
		t.Fatalf("preheat --all-platforms: %s", r)
	}
	checkOrigin("after --all-platforms", "linux/amd64", "linux/arm64", "linux/s390x")
	pull("ctr pull (this machine's platform)")
	pull("ctr pull --all-platforms", "--all-platforms")

	// A platform the index does not have fails, naming what it has.
	r = runPreheat(t, "--cache", cove.URL, "--platform", "windows/amd64", ref)
	if r.code != 1 || !strings.Contains(r.stdout, "no manifest for the platforms asked for (it has linux/amd64, linux/arm64, linux/s390x)") {
		t.Fatalf("preheat --platform windows/amd64: %s", r)
	}
}
