package peers

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

const mib = 1 << 20

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// Both pull paths (ctr through the transfer service, crictl through CRI) fetch a
// 3-layer image from a plain-HTTP origin on 127.0.0.1, and the origin's log shows it.
func TestPullWithCtrAndCrictl(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	origin := StartRegistry(t)
	img := PushRandomImage(t, origin.Addr, "team/app:v1", 3, 1*mib)
	if len(img.Layers) != 3 || img.Size < 3*mib || !strings.HasPrefix(img.Digest, "sha256:") {
		t.Fatalf("unexpected image %+v", img)
	}
	pushed := origin.BlobGETs()

	a := StartContainerd(t)
	if err := a.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	CheckPulled(t, ctx, a, img)
	afterA := origin.BlobGETs()

	b := StartContainerd(t)
	if err := b.CrictlPull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	CheckPulled(t, ctx, b, img)
	afterB := origin.BlobGETs()

	for _, l := range append([]string{img.Config}, img.Layers...) {
		if n := afterA[l] - pushed[l]; n != 1 {
			t.Errorf("ctr pull: origin served %s %d times, want 1", l, n)
		}
		if n := afterB[l] - afterA[l]; n != 1 {
			t.Errorf("crictl pull: origin served %s %d times, want 1", l, n)
		}
	}
	var manifestGETs int
	for _, r := range origin.Requests() {
		if r.Method == "GET" && r.Path == "/v2/team/app/manifests/"+img.Digest && r.Status == 200 {
			manifestGETs++
		}
	}
	if manifestGETs != 2 {
		t.Errorf("origin served the manifest by digest %d times, want 2 (one per containerd)", manifestGETs)
	}
}

// A distribution registry in proxy mode, as containerd's _default mirror, serves the
// pull; its remote (the origin) sees the blob GETs. A mirror that is down is skipped.
func TestProxyRegistryAsMirror(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	origin := StartRegistry(t)
	img := PushRandomImage(t, origin.Addr, "team/app:v1", 3, 1*mib)
	proxy := StartRegistry(t, WithProxyRemote(origin.URL))
	before := origin.BlobGETs()

	c := StartContainerd(t, WithMirror(proxy.URL))
	if err := c.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	CheckPulled(t, ctx, c, img)

	viaProxy := proxy.BlobGETs()
	after := origin.BlobGETs()
	for _, l := range img.Layers {
		if viaProxy[l] != 1 {
			t.Errorf("proxy served layer %s %d times, want 1", l, viaProxy[l])
		}
		if after[l]-before[l] < 1 {
			t.Errorf("origin never served layer %s to the proxy", l)
		}
	}
	// containerd names the origin in ?ns= on every request to a mirror.
	var withNS int
	for _, r := range proxy.Requests() {
		if strings.Contains(r.Path, "/blobs/") && strings.Contains(r.Query, "ns="+strings.ReplaceAll(origin.Addr, ":", "%3A")) {
			withNS++
		}
	}
	if withNS < len(img.Layers) {
		t.Errorf("only %d blob requests to the mirror carried ns=%s", withNS, origin.Addr)
	}

	// A mirror that went away: containerd falls back to the origin.
	dead := StartRegistry(t)
	dead.Stop()
	dead.Stop() // idempotent
	d := StartContainerd(t, WithMirror(dead.URL))
	if err := d.CrictlPull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	CheckPulled(t, ctx, d, img)
}

// concurrent_layer_fetch_buffer makes containerd fetch one layer as several ranged
// GETs (206), on both pull paths; without it one GET fetches the whole layer.
func TestConcurrentLayerFetchBuffer(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	origin := StartRegistry(t)
	const layerSize = 8 * mib
	const chunk = 1 * mib
	img := PushRandomImage(t, origin.Addr, "team/big:v1", 1, layerSize)
	layer := img.Layers[0]
	// The gzip tar is slightly larger than its content: ceil(size/chunk) chunks.
	wantChunks := int((img.Size + chunk - 1) / chunk)

	count := func(since int) (gets, partial int, bytes int64) {
		for _, r := range origin.Requests()[since:] {
			if r.Method == "GET" && strings.HasSuffix(r.Path, "/blobs/"+layer) {
				gets++
				if r.Status == 206 {
					partial++
				}
				bytes += r.Bytes
			}
		}
		return
	}

	mark := len(origin.Requests())
	plain := StartContainerd(t)
	if err := plain.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	CheckPulled(t, ctx, plain, img)
	if gets, partial, _ := count(mark); gets != 1 || partial != 0 {
		t.Errorf("default config: %d GETs (%d partial) of the layer, want one full GET", gets, partial)
	}

	// ctr and CRI use the transfer plugin's setting; CRI in local-pull mode uses its own.
	for _, path := range []string{"ctr", "crictl", "crictl (use_local_image_pull)"} {
		mark := len(origin.Requests())
		opts := []ContainerdOption{WithConcurrentLayerFetchBuffer(chunk)}
		if strings.Contains(path, "local") {
			opts = append(opts, withLocalImagePull())
		}
		c := StartContainerd(t, opts...)
		pull := func(ctx context.Context, ref string) error { return c.Pull(ctx, ref) }
		if path != "ctr" {
			pull = c.CrictlPull
		}
		if err := pull(ctx, img.Ref); err != nil {
			t.Fatal(err)
		}
		CheckPulled(t, ctx, c, img)
		gets, partial, bytes := count(mark)
		t.Logf("%s with concurrent_layer_fetch_buffer=%d: %d GETs of a %d-byte layer, %d answered 206, %d bytes sent",
			path, chunk, gets, img.Size, partial, bytes)
		if gets != wantChunks || partial != wantChunks {
			t.Errorf("%s: %d GETs (%d partial), want %d ranged GETs", path, gets, partial, wantChunks)
		}
	}
}

// Stop reaps the peers and leaves no process, socket or mount behind.
func TestStopLeavesNothing(t *testing.T) {
	t.Parallel()
	r := StartRegistry(t)
	c := StartContainerd(t)
	pids := []int{r.proc.cmd.Process.Pid, c.proc.cmd.Process.Pid}
	r.Stop()
	c.Stop()
	c.Stop()
	for _, pid := range pids {
		if err := syscall.Kill(pid, 0); err != syscall.ESRCH {
			t.Errorf("pid %d still exists after Stop (kill 0: %v)", pid, err)
		}
	}
	if _, err := os.Stat(c.Address); err == nil {
		// containerd removes its socket on a clean shutdown.
		t.Logf("socket %s left behind (removed with its directory at cleanup)", c.Address)
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil && strings.Contains(string(b), c.Root) {
		t.Errorf("mounts left under %s", c.Root)
	}
	if err := c.Pull(testCtx(t), fmt.Sprintf("%s/x/y:z", r.Addr)); err == nil {
		t.Errorf("pull from a stopped containerd succeeded")
	}
}
