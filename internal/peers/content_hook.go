package peers

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// StartContentHookNode starts cove-node with its content hook (and prefill) serving the
// content store of a new containerd root, forwarding to caches, with extra flags (for
// example --origin-plain-http ADDR). It returns the node and the ContainerdSetup that
// runs containerd on that root with the fragment `cove-node print-containerd-config`
// prints, so a test starts the hooked containerd with
// StartContainerdWith(t, setup, WithMirror(node.URL)).
func StartContentHookNode(t testing.TB, caches []string, extra ...string) (*CoveNode, ContainerdSetup) {
	t.Helper()
	base := t.TempDir()
	root := filepath.Join(base, "root")
	sockDir, err := os.MkdirTemp("", "cvn-") // unix socket paths are short
	if err != nil {
		t.Fatalf("peers: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "content.sock")
	out, err := exec.Command(CoveBinary(t, "cove-node"), "print-containerd-config", "--content-socket", sock).Output()
	if err != nil {
		t.Fatalf("peers: cove-node print-containerd-config: %v", err)
	}
	fragment := filepath.Join(base, "cove-node.toml")
	if err := os.WriteFile(fragment, out, 0o644); err != nil {
		t.Fatalf("peers: %v", err)
	}
	args := append([]string{"--content-socket", sock, "--content-root", filepath.Join(root, "io.containerd.content.v1.content")}, extra...)
	node := StartCoveNode(t, caches, args...)
	return node, ContainerdSetup{Root: root, Imports: []string{fragment}}
}
