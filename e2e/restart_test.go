package e2e

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// cove-node restarted (SIGTERM, as systemctl restart does) in the middle of a pull
// through its content hook, on the same socket-activated content socket: the pull
// completes with the right image. containerd's calls made while cove-node is down wait in
// the socket's backlog; calls in flight are drained before the old process exits.
//
// A crash (SIGKILL) at the wrong moment is not hidden: a content Write stream containerd
// has open (it opens a blob's writer before fetching the blob) breaks, and containerd
// does not retry it, so that pull fails and is retried by its caller (kubelet).
func TestContentHookRestartDuringPull(t *testing.T) {
	for _, killAfter := range []time.Duration{300 * time.Millisecond, 1200 * time.Millisecond} {
		t.Run(fmt.Sprintf("restart-after-%s", killAfter), func(t *testing.T) {
			ctx := testCtx(t)
			origin := peers.StartRegistry(t)
			img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 3, 8<<20)
			slow := throttle(t, origin.URL, 12<<20) // the pull takes about 2 s
			ref := slow + "/team/app:v1"
			cove := peers.StartCove(t, "", "--origin-plain-http", slow)

			root := filepath.Join(t.TempDir(), "root")
			sockDir, err := os.MkdirTemp("", "cvr-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(sockDir) })
			sock := filepath.Join(sockDir, "content.sock")
			ln := peers.ListenActivated(t, sock) // what the socket unit holds across restarts
			out, err := exec.Command(peers.CoveBinary(t, "cove-node"), "print-containerd-config", "--content-socket", sock).Output()
			if err != nil {
				t.Fatal(err)
			}
			fragment := filepath.Join(t.TempDir(), "cove-node.toml")
			if err := os.WriteFile(fragment, out, 0o644); err != nil {
				t.Fatal(err)
			}
			probe, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			addr := probe.Addr().String()
			probe.Close()
			argv := []string{peers.CoveBinary(t, "cove-node"), "serve", "--addr", addr, "--cache", cove.URL, "--origin-plain-http", slow,
				"--content-socket", sock, "--content-root", filepath.Join(root, "io.containerd.content.v1.content")}

			node := peers.StartCoveNodeOn(t, ln, argv)
			c := peers.StartContainerdWith(t, peers.ContainerdSetup{Root: root, Imports: []string{fragment}}, peers.WithMirror("http://"+addr))
			pulled := make(chan error, 1)
			go func() { pulled <- c.Pull(ctx, ref) }()
			time.Sleep(killAfter)
			start := time.Now()
			old := node
			node.Stop() // SIGTERM and wait, as systemctl restart does
			t.Logf("old cove-node drained and exited in %s", time.Since(start).Round(time.Millisecond))
			start = time.Now()
			node = peers.StartCoveNodeOn(t, ln, argv)
			t.Logf("cove-node back in %s", time.Since(start).Round(time.Millisecond))
			if err := <-pulled; err != nil {
				before, _ := os.ReadFile(old.LogPath)
				after, _ := os.ReadFile(node.LogPath)
				t.Fatalf("pull across the restart: %v\ncove-node log before the restart:\n%s\nafter:\n%s", err, before, after)
			}
			got, err := c.ImageTarget(ctx, ref)
			if err != nil || got != img.Digest {
				t.Fatalf("target %s, %v; want %s", got, err, img.Digest)
			}
			if err := c.ReadAllContent(ctx, ref); err != nil {
				t.Fatal(err)
			}
		})
	}
}
