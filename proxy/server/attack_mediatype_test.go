package server_test

// Attack tests, hole 3: media type poisoning. A manifest's media type is the word of the
// registry that served it: a hostile registry serving the same bytes under another type
// must not change the type cove-cache gives for the real registry's manifest.

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/internal/peers"
)

const (
	ociManifestType = "application/vnd.oci.image.manifest.v1+json"
	ociIndexType    = "application/vnd.oci.image.index.v1+json"
)

// The victim pulls from the real origin through the cache; a hostile registry serves the
// same manifest bytes as an index and someone fetches them through the cache by digest;
// the victim's next pulls (by tag and digest, GET and HEAD, and containerd's) still get
// the real type. Both for a manifest naming its mediaType and one whose body has none.
func TestAttackMediaTypePoisoning(t *testing.T) {
	o := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, o.Addr, "team/app:v1", 1, 4096)
	_, real := mustGet(t, o.URL+"/v2/team/app/manifests/"+img.Digest, map[string]string{"Accept": acceptManifests}, 200)
	bareBody := plantingManifest(t, o.Addr, img, "", "", func(m map[string]any) { delete(m, "mediaType") })
	bare := putManifest(t, o.Addr, "team/app:bare", types.OCIManifestSchema1, bareBody, "", "")
	bodies := map[string][]byte{img.Digest: real, bare: bareBody}

	hostile := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		i := strings.LastIndex(r.URL.Path, "/manifests/")
		body, ok := bodies[r.URL.Path[i+len("/manifests/"):]]
		if i < 0 || !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", ociIndexType)
		w.Header().Set("Docker-Content-Digest", sha(body))
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		if r.Method == http.MethodGet {
			_, _ = w.Write(body)
		}
	}))
	defer hostile.Close()
	hostileAddr := strings.TrimPrefix(hostile.URL, "http://")
	c := newCache(t, o.Addr, hostileAddr)
	accept := map[string]string{"Accept": acceptManifests}

	for _, tc := range []struct{ tag, digest string }{{"v1", img.Digest}, {"bare", bare}} {
		t.Run(tc.tag, func(t *testing.T) {
			if resp, _ := mustGet(t, c.url(o.Addr, "/v2/team/app/manifests/"+tc.tag), accept, 200); resp.Header.Get("Content-Type") != ociManifestType {
				t.Fatalf("the victim's first pull: Content-Type %q", resp.Header.Get("Content-Type"))
			}
			// The hostile registry's answer is its own business.
			mustGet(t, c.url(hostileAddr, "/v2/team/app/manifests/"+tc.digest), accept, 200)

			for _, method := range []string{http.MethodGet, http.MethodHead} {
				for _, ref := range []string{tc.tag, tc.digest} {
					resp, body, err := do(t, method, c.url(o.Addr, "/v2/team/app/manifests/"+ref), accept)
					if err != nil {
						t.Fatal(err)
					}
					if resp.StatusCode != 200 || resp.Header.Get("Docker-Content-Digest") != tc.digest || method == http.MethodGet && sha(body) != tc.digest {
						t.Fatalf("%s %s: %d, digest %s", method, ref, resp.StatusCode, resp.Header.Get("Docker-Content-Digest"))
					}
					if got := resp.Header.Get("Content-Type"); got != ociManifestType {
						t.Errorf("%s team/app %s from the real origin after the hostile fetch: Content-Type %q, the origin says %q", method, ref, got, ociManifestType)
					}
				}
			}
		})
	}

	// containerd, with the cache as its mirror, pulls both.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ctrd := peers.StartContainerd(t, peers.WithMirror(c.http.URL))
	hits := testutil.ToFloat64(c.srv.Metrics().Requests.WithLabelValues("manifest", "hit"))
	for _, target := range []peers.Image{img, {Ref: o.Addr + "/team/app:bare", Digest: bare, Layers: img.Layers, Config: img.Config}} {
		if err := ctrd.Pull(ctx, target.Ref); err != nil {
			t.Errorf("containerd pull of %s through the cache: %s", target.Ref, ctrError(err))
			continue
		}
		peers.CheckPulled(t, ctx, ctrd, target)
	}
	if testutil.ToFloat64(c.srv.Metrics().Requests.WithLabelValues("manifest", "hit")) == hits {
		t.Error("containerd's pulls did not go through the cache")
	}
}

// ctrError is the line of a ctr failure that says why (its output is mostly progress).
func ctrError(err error) string {
	for _, l := range strings.Split(err.Error(), "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "ctr: ") {
			return strings.TrimSpace(l)
		}
	}
	return err.Error()
}
