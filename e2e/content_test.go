package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
)

// contentHook starts cove-node with the content hook over a containerd root it returns,
// and writes the fragment cove-node print-containerd-config prints.
func contentHook(t *testing.T, cacheURL, origin string) (node *peers.CoveNode, root, fragment string) {
	t.Helper()
	root = filepath.Join(t.TempDir(), "root")
	sockDir, err := os.MkdirTemp("", "cvn-") // unix socket paths are short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "content.sock")
	out, err := exec.Command(peers.CoveBinary(t, "cove-node"), "print-containerd-config", "--content-socket", sock).Output()
	if err != nil {
		t.Fatalf("print-containerd-config: %v", err)
	}
	fragment = filepath.Join(t.TempDir(), "cove-node.toml")
	if err := os.WriteFile(fragment, out, 0o644); err != nil {
		t.Fatal(err)
	}
	caches := []string{}
	if cacheURL != "" {
		caches = append(caches, cacheURL)
	}
	node = peers.StartCoveNode(t, caches, "--origin-plain-http", origin,
		"--content-socket", sock, "--content-root", filepath.Join(root, "io.containerd.content.v1.content"))
	return node, root, fragment
}

// With the content hook, the blobs of the manifest cove-node served are prefilled from
// cove-cache before containerd asks: containerd downloads none itself, unpacks through
// cove-node's differ, and gets the right image. Switching the hook off loses nothing.
func TestContentHookPrefill(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 4, 4<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	node, root, fragment := contentHook(t, cove.URL, origin.Addr)

	c := peers.StartContainerdWith(t, peers.ContainerdSetup{Root: root, Imports: []string{fragment}}, peers.WithMirror(node.URL))
	if err := c.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	checkPulled(t, ctx, c, img)
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
	plain := peers.StartContainerdWith(t, peers.ContainerdSetup{Root: root})
	checkPulled(t, ctx, plain, img)
}

// crictl through the content hook, on a fresh node.
func TestContentHookCrictl(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v2", 2, 2<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	node, root, fragment := contentHook(t, cove.URL, origin.Addr)
	c := peers.StartContainerdWith(t, peers.ContainerdSetup{Root: root, Imports: []string{fragment}}, peers.WithMirror(node.URL))
	if err := c.CrictlPull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	checkPulled(t, ctx, c, img)
}
