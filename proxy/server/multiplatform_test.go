package server_test

import (
	"context"
	"net/http"
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

// platformImage is one platform's image of a multi-platform index.
type platformImage struct {
	platform v1.Platform
	manifest string
	blobs    []string // config and layer
}

// pushMultiPlatform pushes an OCI index of small images (one random gzip tar layer each)
// for platforms to registryAddr/repoAndTag and returns the index digest and its images.
func pushMultiPlatform(t *testing.T, registryAddr, repoAndTag string, platforms ...v1.Platform) (string, []platformImage) {
	t.Helper()
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	var imgs []platformImage
	for _, p := range platforms {
		layer, err := random.Layer(24<<10, types.OCILayer)
		if err != nil {
			t.Fatal(err)
		}
		img, err := mutate.AppendLayers(mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON), layer)
		if err != nil {
			t.Fatal(err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		cf = cf.DeepCopy()
		cf.OS, cf.Architecture, cf.Variant = p.OS, p.Architecture, p.Variant
		if img, err = mutate.ConfigFile(img, cf); err != nil {
			t.Fatal(err)
		}
		d, _ := img.Digest()
		cd, _ := img.ConfigName()
		ld, _ := layer.Digest()
		imgs = append(imgs, platformImage{platform: p, manifest: d.String(), blobs: []string{cd.String(), ld.String()}})
		idx = mutate.AppendManifests(idx, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &p}})
	}
	ref, err := name.ParseReference(registryAddr+"/"+repoAndTag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatalf("push index: %v", err)
	}
	d, _ := idx.Digest()
	return d.String(), imgs
}

// A multi-platform index pulled through cove-cache by containerd for one platform
// (--platform linux/amd64) and for all (--all-platforms), each cold then warm, each by a
// fresh containerd: every pull verifies (ctr reads every blob back against its digest),
// every origin request is cove-cache's (containerd never went round it), a cold pull
// fetches each blob it needs once, and a warm pull costs the origin no blob GET.
func TestMultiPlatformIndexThroughContainerd(t *testing.T) {
	o := peers.StartRegistry(t)
	amd64 := v1.Platform{OS: "linux", Architecture: "amd64"}
	ref := o.Addr + "/team/multi:v1"
	index, imgs := pushMultiPlatform(t, o.Addr, "team/multi:v1", amd64,
		v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}, v1.Platform{OS: "linux", Architecture: "arm", Variant: "v7"})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	for _, mode := range []struct {
		name   string
		args   []string
		wanted func(platformImage) bool // whose layers the pull stores
	}{
		{"linux/amd64", []string{"--platform", "linux/amd64"}, func(p platformImage) bool { return p.platform.Architecture == "amd64" }},
		{"all platforms", []string{"--all-platforms"}, func(platformImage) bool { return true }},
	} {
		t.Run(mode.name, func(t *testing.T) {
			c := newCache(t, o.Addr)
			before := len(o.Requests())
			for _, pass := range []string{"cold", "warm"} {
				start := len(o.Requests())
				ctrd := peers.StartContainerd(t, peers.WithMirror(c.http.URL))
				if err := ctrd.Pull(ctx, ref, mode.args...); err != nil {
					t.Fatalf("%s pull: %s", pass, ctrError(err))
				}
				peers.CheckPulled(t, ctx, ctrd, peers.Image{Ref: ref, Digest: index})
				have, err := ctrd.ContentDigests(ctx)
				if err != nil {
					t.Fatal(err)
				}
				for _, p := range imgs {
					if got := slices.Contains(have, p.blobs[1]); got != mode.wanted(p) {
						t.Errorf("%s pull: layer of %s/%s in the content store: %v", pass, p.platform.OS, p.platform.Architecture, got)
					}
				}
				blobGETs := 0
				for _, q := range o.Requests()[start:] {
					if !strings.HasPrefix(q.UserAgent, "cove-cache") {
						t.Errorf("%s pull: containerd asked the origin itself: %s %s", pass, q.Method, q.Path)
					}
					if q.Method == http.MethodGet && strings.Contains(q.Path, "/blobs/") {
						blobGETs++
					}
				}
				t.Logf("%s pull: %d origin blob GETs, %d origin requests", pass, blobGETs, len(o.Requests())-start)
				if pass == "warm" && blobGETs != 0 {
					t.Errorf("the warm pull cost the origin %d blob GETs", blobGETs)
				}
				ctrd.Stop()
			}
			// Over both passes, each blob was fetched from the origin at most once.
			for d, n := range blobGETsSince(o, before) {
				if n > 1 {
					t.Errorf("%s fetched from the origin %d times", d, n)
				}
			}
		})
	}
}

func blobGETsSince(o *peers.Registry, since int) map[string]int {
	out := map[string]int{}
	for _, q := range o.Requests()[since:] {
		if q.Method == http.MethodGet && strings.Contains(q.Path, "/blobs/") && q.Status == 200 {
			out[q.Path[strings.LastIndex(q.Path, "/")+1:]]++
		}
	}
	return out
}
