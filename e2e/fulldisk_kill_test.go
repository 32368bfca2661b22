package e2e

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

// kill -9 while a full store passes a blob through, while it still spools it and once
// it passes it through: after a restart on the same full disk the spool is empty, no
// partial blob is stored, and the blob is served whole again.
func TestKillDuringPassThrough(t *testing.T) {
	dir := peers.MountTmpfs(t, "size=40m")
	if err := os.WriteFile(filepath.Join(dir, "filler"), make([]byte, 20<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 24<<20)
	layer := digest.Digest(img.Layers[0])
	slow := throttle(t, origin.URL, 12<<20) // ~2 s for the layer
	cove := peers.StartCove(t, dir, "--origin-plain-http", slow)

	// 1 MiB: the spool is being written; 22 MiB: past the 20 MiB free, passing through.
	for _, killAfter := range []int64{1 << 20, 22 << 20} {
		t.Run(fmt.Sprintf("after-%d-bytes", killAfter), func(t *testing.T) {
			u := cove.URL + "/v2/team/app/blobs/" + layer.String() + "?ns=" + url.QueryEscape(slow)
			resp, err := http.Get(u)
			if err != nil {
				t.Fatal(err)
			}
			n, _ := io.CopyN(io.Discard, resp.Body, killAfter)
			cove.Kill9()
			resp.Body.Close()
			t.Logf("client had %d bytes when cove-cache was killed", n)
			cove.Restart(t)
			entries, _ := os.ReadDir(filepath.Join(dir, "spool"))
			if len(entries) != 0 {
				t.Fatalf("spool/ has %d leftovers after restart", len(entries))
			}
			if _, err := os.Stat(filepath.Join(dir, "blobs", "sha256", layer.Encoded())); err == nil {
				t.Fatal("a layer larger than the free space is in the store")
			}
			checkStore(t, cove)

			resp, err = http.Get(cove.URL + "/v2/team/app/blobs/" + layer.String() + "?ns=" + url.QueryEscape(slow))
			if err != nil {
				t.Fatal(err)
			}
			v := layer.Verifier()
			got, err := io.Copy(v, resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != 200 || !v.Verified() {
				t.Fatalf("after restart: status %d, %d bytes, %v, verified %v", resp.StatusCode, got, err, v.Verified())
			}
			if passed := cove.Metric(t, "cove_fills_passed_through_total", `reason="no_space"`); passed != 1 {
				t.Fatalf("passed through %v fills after restart, want 1", passed)
			}
		})
	}
}
