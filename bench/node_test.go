package bench

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// hookedPull pulls img on a fresh containerd whose content store and differ are a fresh
// cove-node's content hook (prefill on), both through that cove-node's resolver hook to
// cache. Only the pull is timed.
func hookedPull(b *testing.B, ctx context.Context, cache, origin string, img peers.Image) time.Duration {
	b.Helper()
	node, setup := peers.StartContentHookNode(b, []string{cache}, "--origin-plain-http", origin)
	defer node.Stop()
	c := peers.StartContainerdWith(b, setup, peers.WithMirror(node.URL))
	defer dropNode(c)
	return timedPull(b, ctx, c, img)
}

// BenchmarkContentHookPull: a 512 MiB, 4-layer pull on a fresh node with cove-node's
// content hook (prefill, unpack through cove-node's differ) against the same pull with
// containerd's built-in store, both through cove-node with cove-cache warm. Target:
// at most 1.0 (the hook should win), hard limit 1.05.
func BenchmarkContentHookPull(b *testing.B) {
	logLoad(b)
	ctx := benchCtx(b)
	layerMiB := envInt("COVE_BENCH_HOOK_LAYER_MIB", 128)
	origin := peers.StartRegistry(b)
	img := peers.PushRandomImage(b, origin.Addr, "team/big:v1", 4, int64(layerMiB)*mib)
	cove := peers.StartCove(b, "", "--origin-plain-http", origin.Addr)
	mirrorOnly := peers.StartCoveNode(b, []string{cove.URL}, "--origin-plain-http", origin.Addr)

	pullFresh(b, ctx, mirrorOnly.URL, img) // fills cove-cache
	waitFills(b, cove)
	pullFresh(b, ctx, mirrorOnly.URL, img)
	hookedPull(b, ctx, cove.URL, origin.Addr, img)

	n := envInt("COVE_BENCH_HOOK_RUNS", 5)
	var hook, builtin []time.Duration
	for range n {
		hook = append(hook, hookedPull(b, ctx, cove.URL, origin.Addr, img))
		builtin = append(builtin, pullFresh(b, ctx, mirrorOnly.URL, img))
	}
	mh, mb := median(hook), median(builtin)
	ratio := mh.Seconds() / mb.Seconds()
	b.Logf("content-hook ratio hook/built-in = %.3f (target <= 1.0, hard limit 1.05, %s): hook %.2fs built-in %.2fs (median of %d, %s, warm cove-cache, fresh node each)",
		ratio, verdict(ratio <= 1.05), mh.Seconds(), mb.Seconds(), n, sizeLabel(img))
	b.Logf("  runs hook:     %s", list(hook))
	b.Logf("  runs built-in: %s", list(builtin))
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ratio, "hook/built-in")
}

// BenchmarkPullCacheFailing: pull time through cove-node with cove-cache down (refused),
// hung (SIGSTOP) and stalling (SIGSTOP 300 ms into the pull), against the same pull
// straight from the origin. Target: at most 1.3 (containerd alone behind a hung mirror:
// 30 s per request). "down" and "hung" are measured twice: with the cache already dead
// for a second when the pull starts (cove-node's background health check has noticed, as
// on a node whose cache died between pulls), and dead the instant the pull starts (the
// first request pays the detection: the probe after 250 ms, bounded by 300 ms).
func BenchmarkPullCacheFailing(b *testing.B) {
	logLoad(b)
	ctx := benchCtx(b)
	origin := peers.StartRegistry(b)
	img := peers.PushRandomImage(b, origin.Addr, "team/app:v1", layers, int64(layerMiB)*mib)
	n := envInt("COVE_BENCH_FAIL_RUNS", 3)
	pullFresh(b, ctx, "", img)
	var direct []time.Duration
	for range n {
		direct = append(direct, pullFresh(b, ctx, "", img))
	}
	md := median(direct)
	for _, mode := range []string{"down", "hung", "down-at-start", "hung-at-start", "stalling"} {
		var times []time.Duration
		for range n {
			cove := peers.StartCove(b, "", "--origin-plain-http", origin.Addr)
			switch mode {
			case "down", "down-at-start":
				cove.Stop()
			case "hung", "hung-at-start":
				cove.Freeze()
			}
			node := peers.StartCoveNode(b, []string{cove.URL}, "--origin-plain-http", origin.Addr)
			if mode == "down" || mode == "hung" {
				time.Sleep(1500 * time.Millisecond)
			}
			if mode == "stalling" {
				t := time.AfterFunc(300*time.Millisecond, cove.Freeze)
				times = append(times, pullFresh(b, ctx, node.URL, img))
				t.Stop()
			} else {
				times = append(times, pullFresh(b, ctx, node.URL, img))
			}
			cove.Thaw()
			node.Stop()
			cove.Stop()
		}
		m := median(times)
		ratio := m.Seconds() / md.Seconds()
		b.Logf("cache-%s ratio via cove-node/origin = %.2f (target <= 1.3, %s): %.2fs vs %.2fs (median of %d, %s)",
			mode, ratio, verdict(ratio <= 1.3), m.Seconds(), md.Seconds(), n, sizeLabel(img))
		b.ReportMetric(ratio, mode+"/origin")
	}
	b.ReportMetric(0, "ns/op")
}

// BenchmarkNodeStart: time from starting cove-node to its resolver hook answering, with
// and without the content hook.
func BenchmarkNodeStart(b *testing.B) {
	var plain, hooked []time.Duration
	for range 5 {
		start := time.Now()
		n := peers.StartCoveNode(b, []string{"http://127.0.0.1:1"})
		plain = append(plain, time.Since(start))
		n.Stop()
		sockDir, _ := os.MkdirTemp("", "cvs-")
		start = time.Now()
		n = peers.StartCoveNode(b, []string{"http://127.0.0.1:1"},
			"--content-socket", filepath.Join(sockDir, "c.sock"), "--content-root", b.TempDir())
		hooked = append(hooked, time.Since(start))
		n.Stop()
		os.RemoveAll(sockDir)
	}
	b.Logf("cove-node start to serving: %.0f ms mirror-only, %.0f ms with the content hook (median of 5; includes the test's 10 ms readiness polling)",
		float64(median(plain).Microseconds())/1000, float64(median(hooked).Microseconds())/1000)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(float64(median(plain).Milliseconds()), "start-ms")
}
