package prefill_test

import (
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

// cove-node's connection to cove-cache drops in the middle of a prefilled layer: the
// prefill asks cove-cache for the rest with a Range request, and every blob still lands
// verified, with one origin fetch each.
func TestPrefillResumesDroppedCacheConnection(t *testing.T) {
	var cut *peers.CutProxy
	r := newRigWith(t, 4<<20, func(cacheURL string) string {
		cut = peers.StartCutProxy(t, strings.TrimPrefix(cacheURL, "http://"), 1<<20)
		return "http://" + cut.Addr
	}, nil)
	req, _ := http.NewRequest(http.MethodGet, r.url("/v2/team/app/manifests/"+r.img.Digest), nil)
	req.Header.Set("Accept", accept)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body) // its body waits for the prefill
	resp.Body.Close()
	if resp.StatusCode != 200 || digest.FromBytes(body).String() != r.img.Digest {
		t.Fatalf("manifest: %d", resp.StatusCode)
	}
	if !cut.Cut() {
		t.Fatal("no connection to cove-cache was cut")
	}
	for _, d := range append([]string{r.img.Config}, r.img.Layers...) {
		p := filepath.Join(r.content, "blobs", "sha256", digest.Digest(d).Encoded())
		if got := fileDigest(t, p); got != d {
			t.Fatalf("blob %s not prefilled (got %q)", d, got)
		}
		if n := r.origin.BlobGETs()[d]; n != 1 {
			t.Fatalf("origin GETs of %s = %d, want 1", d, n)
		}
	}
}
