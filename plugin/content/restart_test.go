package content

import (
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// With socket activation the socket outlives the hook process: containerd's calls
// made while the hook is down wait in the socket's backlog and succeed once the hook
// is back (within containerd's ~1 s connect deadline), instead of failing.
func TestRestartSocketActivated(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 2*time.Minute)
	reg := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, reg.Addr, "team/restart:v1", 2, 512<<10)
	after := peers.PushRandomImage(t, reg.Addr, "team/after:v1", 1, 512<<10)

	// What systemd does for a .socket unit: it creates and listens on the socket.
	sock := filepath.Join(shortDir(t), "cove.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	root := filepath.Join(t.TempDir(), "root")
	logPath := filepath.Join(t.TempDir(), "hook.log")

	hook := startActivated(t, ln, root, logPath)
	c := peers.StartContainerdWith(t, peers.ContainerdSetup{Root: root, Imports: []string{fragmentFile(t, sock)}})
	if err := c.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	checkPulled(t, ctx, c, img)

	// 1. Restart while containerd is idle: its next content call reconnects to the
	// same socket and succeeds.
	hook.kill()
	hook = startActivated(t, ln, root, logPath)
	if err := c.ReadAllContent(ctx, img.Ref); err != nil {
		t.Fatalf("content call after an idle restart: %v", err)
	}

	// 2. A call made while the hook is down waits in the socket's backlog. containerd
	// gives a proxy connection attempt only ~1 s to get the server's HTTP/2 preface
	// (cmd/containerd/server/server.go dials proxy plugins with
	// grpc.ConnectParams{Backoff: MaxDelay 3 s} and no MinConnectTimeout, so grpc-go
	// uses the backoff, 1 s on the first attempt, as the connect deadline), so the
	// hook must be back within that second.
	hook.kill()
	const down = 300 * time.Millisecond
	read := make(chan error, 1)
	start := time.Now()
	go func() { read <- c.ReadAllContent(ctx, img.Ref) }()
	select {
	case err := <-read:
		t.Fatalf("content call finished while the hook was down (err %v): it should wait", err)
	case <-time.After(down):
	}
	restart := time.Now()
	startActivated(t, ln, root, logPath)
	t.Logf("hook process ready %v after its start", time.Since(restart).Round(time.Millisecond))
	if err := <-read; err != nil {
		t.Fatalf("content call across the restart: %v", err)
	}
	if waited := time.Since(start); waited < down {
		t.Fatalf("content call returned after %v, before the hook was back", waited)
	}

	// And containerd carries on: a pull through the restarted hook.
	if err := c.Pull(ctx, after.Ref); err != nil {
		t.Fatal(err)
	}
	checkPulled(t, ctx, c, after)
}
