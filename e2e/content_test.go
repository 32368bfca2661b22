package e2e

import (
	"testing"

	"github.com/cove-oci/cove/internal/peers"
)

// With the content hook, the blobs of the manifest cove-node served are prefilled from
// cove-cache before containerd asks: containerd downloads none itself, unpacks through
// cove-node's differ, and gets the right image. Switching the hook off loses nothing.
func TestContentHookPrefill(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 4, 4<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	node, setup := peers.StartContentHookNode(t, []string{cove.URL}, "--origin-plain-http", origin.Addr)

	c := peers.StartContainerdWith(t, setup, peers.WithMirror(node.URL))
	if err := c.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, c, img)
	for _, d := range allBlobs(img) {
		if n := origin.BlobGETs()[d]; n != 1 {
			t.Errorf("origin GETs of %s = %d, want 1", d, n)
		}
	}
	// containerd asked the mirror for the manifest only (HEAD by tag, GET by digest):
	// every blob was already in its content store.
	if n := node.Metric(t, "cove_node_requests_total"); n > 2 {
		t.Fatalf("containerd sent %v requests to the resolver hook; prefilled blobs were downloaded again", n)
	}

	// The hook off: containerd's built-in store on the same root has everything.
	c.Stop()
	plain := peers.StartContainerdWith(t, peers.ContainerdSetup{Root: setup.Root})
	peers.CheckPulled(t, ctx, plain, img)
}

// crictl through the content hook, on a fresh node.
func TestContentHookCrictl(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v2", 2, 2<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	node, setup := peers.StartContentHookNode(t, []string{cove.URL}, "--origin-plain-http", origin.Addr)
	c := peers.StartContainerdWith(t, setup, peers.WithMirror(node.URL))
	if err := c.CrictlPull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, c, img)
}
