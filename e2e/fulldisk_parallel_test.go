package e2e

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// A cove-cache whose storage is a 48 MiB tmpfs, fetching cold blobs of 64 MiB and more
// in parallel ranges (its default), is containerd's only mirror for a cold image with
// an 80 MiB layer. The layer's fill meets the full disk while it spools ranges, and goes
// on in one stream from the end of the prefix it spooled: the pull succeeds, served by
// cove-cache (every origin blob GET is cove-cache's: containerd never went round it), no
// fill failed, nothing corrupt is stored. Once the tmpfs grows, the next pull stores the
// layer, without a restart.
func TestFullDiskParallelFill(t *testing.T) {
	ctx := testCtx(t)
	dir := peers.MountTmpfs(t, "size=48m")
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/model:v1", 1, 80<<20)
	layer := img.Layers[0]
	cove := peers.StartCove(t, dir, "--origin-plain-http", origin.Addr, "--log-level", "debug")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("cove-cache log:\n%s", tail(cove.LogPath))
		}
	})

	from := len(origin.Requests())
	c := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	start := time.Now()
	if err := c.Pull(ctx, img.Ref); err != nil {
		t.Fatalf("pull with a full store: %v", err)
	}
	t.Logf("cold pull of an %d MiB layer with a 48 MiB store took %s; cove-cache peak RSS %s",
		img.Size>>20, time.Since(start).Round(time.Millisecond), peakRSS(cove.Pid()))
	peers.CheckPulled(t, ctx, c, img)

	gets := originBlobGETs(t, origin, from)
	if n := len(gets[img.Config]); n != 1 {
		t.Errorf("origin GETs of the config = %d, want 1", n)
	}
	whole, ranged := 0, 0
	for _, q := range gets[layer] {
		switch q.Status {
		case http.StatusOK:
			whole++
		case http.StatusPartialContent:
			ranged++
		default:
			t.Errorf("origin answered a layer GET with %d", q.Status)
		}
	}
	t.Logf("origin layer GETs: %d whole, %d ranged", whole, ranged)
	if ranged == 0 {
		t.Fatal("the layer was not fetched in ranges")
	}
	// A fill that ended would break containerd's transfer; containerd asks cove-cache
	// again from its offset, and that is a second fill: a second whole-body GET.
	if n := cove.Metric(t, "cove_fill_duration_seconds_count", `result="failed"`); n != 0 {
		t.Errorf("%v fills failed", n)
	}
	var switchedAt []float64
	for _, l := range cove.Logs(t) {
		if l["msg"] == "spool failed while fetching a blob in ranges: fetching the rest in one stream, passed through unstored" && l["digest"] == layer {
			from, _ := l["from"].(float64)
			switchedAt = append(switchedAt, from)
		}
	}
	if len(switchedAt) != 1 {
		t.Fatalf("the ranged fill went on in one stream %d times, want 1", len(switchedAt))
	}
	t.Logf("the ranged fill met the full disk and fetched the rest from byte %.0f", switchedAt[0])
	wantWhole := 1
	if switchedAt[0] == 0 {
		wantWhole = 2 // the rest from byte 0 is a plain GET
	}
	if whole != wantWhole {
		t.Errorf("origin whole-body GETs of the layer = %d, want %d: one fill", whole, wantWhole)
	}
	passed := cove.Metric(t, "cove_fills_passed_through_total", `reason="no_space"`)
	storeErrs := cove.Metric(t, "cove_fill_store_errors_total", `operation="write"`, `reason="no_space"`)
	if passed != 1 || storeErrs != 1 {
		t.Errorf("fills passed through for want of space: %v, no-space write errors: %v; want 1 and 1", passed, storeErrs)
	}
	stored := checkStore(t, cove)
	if stored[layer] {
		t.Fatal("a layer larger than the store is stored")
	}
	if code, body := readyz(t, cove); code != http.StatusOK || !strings.Contains(body, "store degraded") || !strings.Contains(body, "no_space") {
		t.Fatalf("readyz while the store is full = %d %q", code, body)
	}
	if v := cove.Metric(t, "cove_store_degraded"); v != 1 {
		t.Fatalf("cove_store_degraded = %v while the store is full", v)
	}

	// Space returns: grow the tmpfs under the running cove-cache. The store is still
	// degraded when the layer's next fill starts, so it goes in one stream, and stores it.
	peers.RemountTmpfs(t, dir, 0, "size=256m")
	from = len(origin.Requests())
	c2 := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := c2.Pull(ctx, img.Ref); err != nil {
		t.Fatalf("pull after space returned: %v", err)
	}
	peers.CheckPulled(t, ctx, c2, img)
	gets = originBlobGETs(t, origin, from)
	if qs := gets[layer]; len(qs) != 1 || qs[0].Status != http.StatusOK || len(gets) != 1 {
		t.Errorf("origin blob GETs after space returned: %v; want one whole-body GET of the layer", gets)
	}
	if stored := checkStore(t, cove); !stored[layer] {
		t.Fatal("layer not stored after space returned")
	}
	if code, body := readyz(t, cove); code != http.StatusOK || body != "ok\n" {
		t.Fatalf("readyz after space returned = %d %q", code, body)
	}
	if n := countLogs(t, cove, "store cannot take blobs: passing fills through unstored until it can"); n != 1 {
		t.Errorf("entering the degraded condition logged %d times, want 1", n)
	}
	if n := countLogs(t, cove, "store takes blobs again"); n != 1 {
		t.Errorf("recovery logged %d times, want 1", n)
	}
}
