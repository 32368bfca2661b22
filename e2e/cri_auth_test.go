package e2e

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// What CRI does with a pull's credentials, by the AuthConfig.server_address the CRI
// client sets (the kubelet leaves it empty, for pull secrets and credential-provider
// plugins alike; other CRI clients may not), through cove-node to a token-authenticated
// origin. containerd hands the credentials only to the host server_address names, or
// to every host when it is empty (ParseAuth, internal/cri/server/images/image_pull.go):
//
//   - empty: cove-node gets them, the pull goes through cove-cache;
//   - the origin's URL: cove-node gets none, containerd's anonymous token is refused
//     there, and containerd fetches everything from the origin itself: the pull goes
//     round the cache, and cove-node counts and logs it;
//   - cove-node's URL: the pull goes through the cache, and the origin would get no
//     credential if containerd had to fall back to it;
//   - host:port without a scheme: containerd fails the pull (it cannot parse it).
func TestCRIServerAddress(t *testing.T) {
	origin := peers.StartTokenOrigin(t, map[string]string{"team-a": "team-a-secret-1x"})
	img := origin.Push(t, "team-a/app:v1", 2, 256<<10)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	const window = 2 * time.Second
	node := peers.StartCoveNode(t, []string{cove.URL}, "--origin-plain-http", origin.Addr, "--around-cache-window", window.String())
	around := func() float64 { return node.Metric(t, "cove_node_pulls_around_cache_total") }
	sent := func() float64 { return cove.Metric(t, "cove_bytes_sent_total") }

	for _, tc := range []struct {
		name, serverAddress string
		wantAround          float64 // pulls cove-node counts as round the cache
		wantCache           bool    // the blobs came through cove-cache
		wantErr             string  // the pull fails with this
	}{
		{name: "empty", serverAddress: "", wantCache: true},
		{name: "origin-url", serverAddress: "http://" + origin.Addr, wantAround: 1},
		{name: "mirror-url", serverAddress: node.URL, wantCache: true},
		{name: "origin-without-scheme", serverAddress: origin.Addr, wantErr: "parse server address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := testCtx(t)
			c := peers.StartContainerd(t, peers.WithMirror(node.URL))
			around0, sent0 := around(), sent()
			_, err := c.CRIPull(ctx, img.Ref, &peers.CRIAuth{Username: "team-a", Password: origin.Passwords["team-a"], ServerAddress: tc.serverAddress})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("pull: %v; want an error with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			peers.CheckPulled(t, ctx, c, img)
			time.Sleep(window + time.Second) // until cove-node has judged the pull
			gotAround, gotSent := around()-around0, sent()-sent0
			t.Logf("server_address %q: counted round the cache %v, cove-cache sent %v bytes", tc.serverAddress, gotAround, gotSent)
			if gotAround != tc.wantAround {
				t.Errorf("cove_node_pulls_around_cache_total +%v, want +%v", gotAround, tc.wantAround)
			}
			if through := gotSent >= float64(img.Size); through != tc.wantCache {
				t.Errorf("cove-cache sent %v bytes of a %d-byte image; want through the cache: %v", gotSent, img.Size, tc.wantCache)
			}
		})
	}
	if n := node.Metric(t, "cove_node_pulls_around_cache_total", `registry="`+origin.Addr+`"`, `reason="credentials-refused"`); n != 1 {
		t.Errorf("pulls round the cache by registry and reason: %v, want 1 (an anonymous token refused)", n)
	}
	node.Stop()
	b, err := os.ReadFile(node.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	if n := strings.Count(text, "went round the cache"); n != 1 || !strings.Contains(text, "team-a/app") {
		t.Errorf("%d log lines about a pull round the cache, want 1 naming the repository", n)
	}
	for _, s := range append(origin.Tokens.Tokens(), origin.Passwords["team-a"]) {
		if strings.Contains(text, s) {
			t.Fatalf("cove-node's log holds a credential (%s...)", s[:8])
		}
	}
}
