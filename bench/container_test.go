package bench

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// containerRun is one timed run: pull, then the container's run, and their sum; rerun
// (not in total) is a second container of the same image on the same node right after,
// the run alone with nothing left to fetch or unpack.
type containerRun struct{ pull, run, total, rerun time.Duration }

var containerSeq atomic.Int64

// pullAndRun pulls img on c (`ctr image pull`), then runs its entrypoint in a container
// (`ctr run --rm`), and returns the time of each and of both together: from the start of
// the pull to the container having run its command and exited. It checks the image
// target and the program's output.
func pullAndRun(b testing.TB, ctx context.Context, c *peers.Containerd, img peers.Image) containerRun {
	b.Helper()
	id := fmt.Sprintf("cove-bench-%d-%d", os.Getpid(), containerSeq.Add(1))
	quiesce()
	start := time.Now()
	if err := c.Pull(ctx, img.Ref); err != nil {
		b.Fatal(err)
	}
	pulled := time.Now()
	out, err := c.Run(ctx, img.Ref, id, peers.RunnableEntrypoint)
	if err != nil {
		b.Fatal(err)
	}
	end := time.Now()
	if !strings.Contains(string(out), peers.RunnableMessage) {
		b.Fatalf("ctr run %s: output %q, want %q", img.Ref, out, peers.RunnableMessage)
	}
	checkTarget(b, ctx, c, img)
	again := time.Now()
	if _, err := c.Run(ctx, img.Ref, id+"-again", peers.RunnableEntrypoint); err != nil {
		b.Fatal(err)
	}
	return containerRun{pull: pulled.Sub(start), run: end.Sub(pulled), total: end.Sub(start), rerun: time.Since(again)}
}

// containerFresh is pullAndRun on a fresh containerd with mirror as its `_default`
// mirror ("" for none: straight from the origin).
func containerFresh(b testing.TB, ctx context.Context, mirror string, img peers.Image) containerRun {
	b.Helper()
	c := newNode(b, mirror)
	defer dropNode(c)
	return pullAndRun(b, ctx, c, img)
}

// containerCold is containerFresh through a new cove-node in front of a new, empty
// cove-cache: every blob is a miss that cove-cache fills from the origin while serving.
// Starting and stopping both is not timed.
func containerCold(b testing.TB, ctx context.Context, origin string, img peers.Image) containerRun {
	b.Helper()
	cove := peers.StartCove(b, "", "--origin-plain-http", origin)
	node := peers.StartCoveNode(b, []string{cove.URL}, "--origin-plain-http", origin)
	r := containerFresh(b, ctx, node.URL, img)
	node.Stop()
	cove.Stop()
	_ = os.RemoveAll(cove.StorageDir)
	return r
}

// containerHooked is pullAndRun on a fresh containerd whose content store and differ are
// a fresh cove-node's content hook (prefill on), through that cove-node to cache (the
// setup of hookedPull). Only the pull and the run are timed.
func containerHooked(b testing.TB, ctx context.Context, cache, origin string, img peers.Image) containerRun {
	b.Helper()
	node, setup := peers.StartContentHookNode(b, []string{cache}, "--origin-plain-http", origin)
	defer node.Stop()
	c := peers.StartContainerdWith(b, setup, peers.WithMirror(node.URL))
	defer dropNode(c)
	return pullAndRun(b, ctx, c, img)
}

// BenchmarkTimeToContainer: time from the start of `ctr image pull` to the container
// having run its command (`ctr run --rm`, runc from Debian, containerd-shim-runc-v2
// v2.3.4), on a fresh node each run, for a 4 x 48 MiB image whose base layer holds a
// static program: straight from the origin, through cove-node (mirror-only) with
// cove-cache warm and cold (a new cove-cache each run), and through cove-node's content
// hook (prefill) with cove-cache warm. Container start is what users feel. Sides
// alternate; each figure is the median of COVE_BENCH_CTR_RUNS runs (3).
func BenchmarkTimeToContainer(b *testing.B) {
	logLoad(b)
	ctx := benchCtx(b)
	peers.RuntimeOnPath(b)
	n := envInt("COVE_BENCH_CTR_RUNS", 3)
	origin := peers.StartRegistry(b)
	img := peers.PushRunnableImage(b, origin.Addr, "team/run:v1", layers, int64(layerMiB)*mib)
	cove := peers.StartCove(b, "", "--origin-plain-http", origin.Addr)
	mirrorOnly := peers.StartCoveNode(b, []string{cove.URL}, "--origin-plain-http", origin.Addr)

	// Untimed: fill cove-cache, and run each side once (page cache, first-exec costs).
	containerFresh(b, ctx, mirrorOnly.URL, img)
	waitFills(b, cove)
	containerFresh(b, ctx, "", img)
	containerFresh(b, ctx, mirrorOnly.URL, img)
	containerHooked(b, ctx, cove.URL, origin.Addr, img)

	sides := []struct {
		name string
		do   func() containerRun
	}{
		{"origin", func() containerRun { return containerFresh(b, ctx, "", img) }},
		{"warm", func() containerRun { return containerFresh(b, ctx, mirrorOnly.URL, img) }},
		{"cold", func() containerRun { return containerCold(b, ctx, origin.Addr, img) }},
		{"hook-warm", func() containerRun { return containerHooked(b, ctx, cove.URL, origin.Addr, img) }},
	}
	res := make([][]containerRun, len(sides))
	for i := range n {
		for j := range sides {
			k := (i + j) % len(sides) // rotate the order each round
			res[k] = append(res[k], sides[k].do())
		}
	}
	pick := func(rs []containerRun, f func(containerRun) time.Duration) []time.Duration {
		var ds []time.Duration
		for _, r := range rs {
			ds = append(ds, f(r))
		}
		return ds
	}
	total := func(r containerRun) time.Duration { return r.total }
	pullT := func(r containerRun) time.Duration { return r.pull }
	runT := func(r containerRun) time.Duration { return r.run }
	rerunT := func(r containerRun) time.Duration { return r.rerun }
	base := median(pick(res[0], total))
	b.Logf("time to container (%s + static entrypoint, fresh node each run, median of %d): origin %.2fs", sizeLabel(img), n, base.Seconds())
	for k, s := range sides {
		m := median(pick(res[k], total))
		ratio := m.Seconds() / base.Seconds()
		if k > 0 {
			b.Logf("time-to-container ratio %s/origin = %.2f: %.2fs vs %.2fs", s.name, ratio, m.Seconds(), base.Seconds())
			b.ReportMetric(ratio, s.name+"/origin")
		}
		b.Logf("  %-9s total %.2fs (pull %.2fs + run %.2fs; second run %.2fs, not counted); runs total: %s; pull: %s; run: %s; second run: %s",
			s.name, m.Seconds(), median(pick(res[k], pullT)).Seconds(), median(pick(res[k], runT)).Seconds(),
			median(pick(res[k], rerunT)).Seconds(),
			list(pick(res[k], total)), list(pick(res[k], pullT)), list(pick(res[k], runT)), list(pick(res[k], rerunT)))
	}
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(base.Seconds(), "origin-s")
}
