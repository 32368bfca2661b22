package content

import (
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// The hook serves containerd's own store directory, so switching it off or on keeps
// every image and blob: pulled with the built-in store, then read and extended through
// the hook, then read again with the built-in store.
func TestSwitchHookOffAndOn(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 2*time.Minute)
	reg := peers.StartRegistry(t)
	builtinImg := peers.PushRandomImage(t, reg.Addr, "team/builtin:v1", 2, 512<<10)
	hookImg := peers.PushRandomImage(t, reg.Addr, "team/hook:v1", 2, 512<<10)
	root := filepath.Join(t.TempDir(), "root")

	// 1. Built-in content store.
	c := peers.StartContainerdWith(t, peers.ContainerdSetup{Root: root})
	if err := c.Pull(ctx, builtinImg.Ref); err != nil {
		t.Fatal(err)
	}
	checkPulled(t, ctx, c, builtinImg)
	c.Stop()

	// 2. Hook on, same root: the built-in store's image is there; pull another.
	h := startHooked(t, root)
	checkPulled(t, ctx, h.c, builtinImg)
	if err := h.c.Pull(ctx, hookImg.Ref); err != nil {
		t.Fatal(err)
	}
	checkPulled(t, ctx, h.c, hookImg)
	if got := h.svc.Stats().Applies; got != int64(len(hookImg.Layers)) {
		t.Errorf("%d Apply calls on the hook, want %d", got, len(hookImg.Layers))
	}
	h.c.Stop()
	h.svc.Close()

	// 3. Hook off again: both images, every blob.
	c = peers.StartContainerdWith(t, peers.ContainerdSetup{Root: root})
	checkPulled(t, ctx, c, builtinImg)
	checkPulled(t, ctx, c, hookImg)
}

// Listen removes a stale socket, refuses a live one, and makes the socket 0660 in a
// 0700 directory.
func TestListen(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(shortDir(t), "sub", "c.sock")
	ln, activated, err := Listen(sock)
	if err != nil || activated {
		t.Fatalf("Listen: %v activated=%v", err, activated)
	}
	if _, _, err := Listen(sock); err == nil {
		t.Fatal("Listen took over a live socket")
	}
	st, err := statMode(sock)
	if err != nil || st != 0o660 {
		t.Fatalf("socket mode %o (%v), want 660", st, err)
	}
	if st, err := statMode(filepath.Dir(sock)); err != nil || st != 0o700 {
		t.Fatalf("directory mode %o (%v), want 700", st, err)
	}
	// A socket file left behind by a killed process: nobody listens on it.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	// Parallel tests start containerd processes, and a child holds a copy of every
	// descriptor between its fork and its exec (close-on-exec ones too): for that moment
	// the closed listener still accepts, and the socket looks live. Seen once under make
	// test; so the stale socket is tried for up to a second.
	var ln2 net.Listener
	for try := 0; ; try++ {
		if ln2, _, err = Listen(sock); err == nil || try == 20 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	ln2.Close()
	if _, _, err := Listen(filepath.Dir(sock)); err == nil || errors.Is(err, net.ErrClosed) {
		t.Fatalf("Listen on a directory: %v", err)
	}
}
