package e2e

import (
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// With the content hook, a cove-cache that fails while the prefill fetches from it
// costs a pull no more than the same failure costs the resolver hook alone
// (TestPullSurvivesCacheFailures): the prefill gives up when cove-cache fails its
// health probe, the manifest's body is not held until MaxHold, and containerd fetches
// from the origin what was not prefilled. ctr pulls with --hosts-dir through cove-node.
func TestContentHookSurvivesCacheFailures(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 3, 8<<20)
	for _, tc := range []struct {
		name string
		// cache returns the cache URL cove-node is given, and the FailingCache in
		// front of cove-cache, if any.
		cache func(t *testing.T) (string, *peers.FailingCache)
	}{
		{name: "hung-from-start", cache: func(t *testing.T) (string, *peers.FailingCache) {
			c := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
			c.Freeze()
			t.Cleanup(c.Thaw)
			return c.URL, nil
		}},
		// Accepts the prefill's requests and never answers, /healthz neither.
		{name: "hung-after-manifest", cache: func(t *testing.T) (string, *peers.FailingCache) {
			c := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
			fc := peers.StartFailingCache(t, c.URL, peers.HangAfterManifest, 0)
			return fc.URL, fc
		}},
		// Sends the headers and 1 MiB of each layer, then stops.
		{name: "stalling-mid-blob", cache: func(t *testing.T) (string, *peers.FailingCache) {
			c := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
			fc := peers.StartFailingCache(t, c.URL, peers.StallAfterManifest, 1<<20)
			return fc.URL, fc
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t)
			cacheURL, fc := tc.cache(t)
			node, setup := peers.StartContentHookNode(t, []string{cacheURL}, "--origin-plain-http", origin.Addr)
			c := peers.StartContainerdWith(t, setup, peers.WithMirror(node.URL))
			start := time.Now()
			if err := c.Pull(ctx, img.Ref); err != nil {
				t.Fatal(err)
			}
			took := time.Since(start)
			peers.CheckPulled(t, ctx, c, img)
			if fc != nil && !fc.Tripped() {
				t.Fatal("the cache never failed: nothing was exercised")
			}
			fallbacks := node.Metric(t, "cove_node_requests_total", `served_by="origin"`) +
				node.Metric(t, "cove_node_requests_total", `served_by="handoff"`)
			t.Logf("%s: pull took %s; fallbacks %v, from the prefill %v", tc.name, took.Round(time.Millisecond),
				fallbacks, node.Metric(t, "cove_node_requests_total", `served_by="prefill"`))
			if fallbacks == 0 {
				t.Fatal("nothing fell back: the failure was not exercised")
			}
			// The bound of the resolver hook's own test; containerd alone waits 30 s for
			// the headers of each request to a hung mirror, and a held manifest 20 s.
			if took > 15*time.Second {
				t.Fatalf("pull took %s", took)
			}
		})
	}
}
