package server_test

// Items of the OCI distribution-spec conformance suite (run by hand: docs/benchmarks.md)
// that cove-cache answered differently from its origin, kept as regression tests: cove
// must give the status the bare origin gives, cold and warm.

import (
	"net/http"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
)

func TestConformanceAnswersAsTheOrigin(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 64<<10)
	c := newCache(t, origin.Addr)
	layer := "/v2/team/app/blobs/" + img.Layers[0]

	for _, tc := range []struct {
		name, path string
		hdr        map[string]string
		want       int
	}{
		{"a manifest reference that cannot be a tag", "/v2/team/app/manifests/.INVALID_MANIFEST_NAME", map[string]string{"Accept": acceptManifests}, http.StatusNotFound},
		{"a range whose last byte precedes its first", layer, map[string]string{"Range": "bytes=500-0"}, http.StatusRequestedRangeNotSatisfiable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			direct, _, err := do(t, http.MethodGet, origin.URL+tc.path, tc.hdr)
			if err != nil {
				t.Fatal(err)
			}
			if direct.StatusCode != tc.want {
				t.Fatalf("the origin answers %d, the test expects it to answer %d", direct.StatusCode, tc.want)
			}
			for _, when := range []string{"cold", "warm"} {
				if when == "warm" { // the blob is cached now
					mustGet(t, c.url(origin.Addr, layer), nil, http.StatusOK)
					c.settle(t)
				}
				resp, body, err := do(t, http.MethodGet, c.url(origin.Addr, tc.path), tc.hdr)
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != tc.want {
					t.Errorf("%s: cove-cache answered %d %.200s, the origin %d", when, resp.StatusCode, body, direct.StatusCode)
				}
			}
		})
	}
	// The suite's ping answers cove-cache's challenge with an empty Basic credential
	// (no user, no password): anonymous, so it gets a token.
	if resp, body, err := doBasic(t, c.http.URL+"/token?service=cove&scope=repository:"+origin.Addr+"/team/app:pull", "", ""); err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("token for an empty Basic credential: %v %v %.200s, want 200", err, resp.StatusCode, body)
	}
}
