package bench

// Each benchmark measures cove-cache and its anchor side by side in one run, alternating
// the two sides run by run (A B A B ...) and comparing medians, and prints one line per
// figure: `<name> ratio ... = R (target ..., met|MISSED): ...`. b.ReportMetric carries
// the same figures into the benchmark result line. Run with -benchtime 1x (make bench):
// a benchmark measures everything once per invocation, whatever b.N is.
//
// The peers are real processes on 127.0.0.1 (internal/peers): distribution v3 as the
// origin (and, in proxy mode, as the anchor cache), containerd v2 pulling with ctr, and
// the cove-cache binary built from this checkout.

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// BenchmarkWarmPull: a pull served entirely from cove-cache's cache against the same pull
// straight from the origin, each by a fresh containerd (empty content store), both on
// loopback, so the ratio is the cost of the extra hop and of cove-cache's own work
// (the tag revalidation at the origin included). Target: ratio <= 1.05.
func BenchmarkWarmPull(b *testing.B) {
	logLoad(b)
	ctx := benchCtx(b)
	origin := peers.StartRegistry(b)
	img := peers.PushRandomImage(b, origin.Addr, "team/app:v1", layers, int64(layerMiB)*mib)
	cove := peers.StartCove(b, "", "--origin-plain-http", origin.Addr)
	blobs := allBlobs(img)

	// Untimed: the pull that fills the cache, and one warm-up pull of each side.
	pullFresh(b, ctx, cove.URL, img)
	waitFills(b, cove)
	pullFresh(b, ctx, cove.URL, img)
	pullFresh(b, ctx, "", img)

	gets0 := origin.BlobGETs()
	hits0 := cove.Metric(b, "cove_requests_total", `operation="blob"`, `result="hit"`)
	originReqs0 := cove.Metric(b, "cove_origin_requests_total")
	var viaCove, direct []time.Duration
	for range runs {
		viaCove = append(viaCove, pullFresh(b, ctx, cove.URL, img))
		direct = append(direct, pullFresh(b, ctx, "", img))
	}
	// The cove-cache pulls must have been served by it: the origin served each blob
	// only to the direct pulls, and cove-cache counted a hit per blob per pull.
	for i, n := range delta(gets0, origin.BlobGETs(), blobs) {
		if n != runs {
			b.Fatalf("origin served blob %s %d times during %d direct and %d cached pulls, want %d: a cached pull fell back to the origin",
				blobs[i], n, runs, runs, runs)
		}
	}
	if hits := cove.Metric(b, "cove_requests_total", `operation="blob"`, `result="hit"`) - hits0; int(hits) != runs*len(blobs) {
		b.Fatalf("cove-cache blob hits = %v, want %d", hits, runs*len(blobs))
	}

	originReqs := cove.Metric(b, "cove_origin_requests_total") - originReqs0

	mc, md := median(viaCove), median(direct)
	ratio := mc.Seconds() / md.Seconds()
	b.Logf("warm-pull ratio cove/origin = %.3f (target <= 1.05, %s): cove %.2fs origin %.2fs (median of %d, %s, fresh containerd each)",
		ratio, verdict(ratio <= 1.05), mc.Seconds(), md.Seconds(), runs, sizeLabel(img))
	b.Logf("  runs cove:   %s", list(viaCove))
	b.Logf("  runs origin: %s", list(direct))
	b.Logf("  cove-cache asked the origin %.1f times per warm pull (tag revalidation, and a HEAD per blob when its authorization is older than --authz-ttl)",
		originReqs/float64(runs))
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ratio, "cove/origin")
	b.ReportMetric(mc.Seconds(), "cove-s")
	b.ReportMetric(md.Seconds(), "origin-s")
}

// BenchmarkColdPull: a pull through a cove-cache with an empty cache (a new process on a
// new storage directory each run, so every blob is a fill streamed while it arrives)
// against the same pull straight from the origin. Target: ratio <= 1.15.
func BenchmarkColdPull(b *testing.B) {
	logLoad(b)
	coldPullBench(b, false)
}

// BenchmarkColdPullOwnCPU is BenchmarkColdPull with cove-cache given a CPU of its own, as
// a cluster cache on its own machine would have: this process, ctr, containerd and the
// origin are pinned to CPU 0 on both sides, cove-cache alone to CPU 1. Informative (no
// target): set against BenchmarkColdPull, it separates what a cold fill costs from what
// sharing two cores with containerd costs.
func BenchmarkColdPullOwnCPU(b *testing.B) {
	if runtime.NumCPU() < 2 {
		b.Skip("needs 2 CPUs")
	}
	logLoad(b)
	coldPullBench(b, true)
}

func coldPullBench(b *testing.B, ownCPU bool) {
	ctx := benchCtx(b)
	origin := peers.StartRegistry(b)
	img := peers.PushRandomImage(b, origin.Addr, "team/app:v1", layers, int64(layerMiB)*mib)
	blobs := allBlobs(img)
	if ownCPU {
		all := fmt.Sprintf("0-%d", runtime.NumCPU()-1)
		pin(b, os.Getpid(), "0")
		b.Cleanup(func() { pin(b, os.Getpid(), all) })
		pin(b, registryPid(origin), "0")
	}

	coldPull := func() time.Duration {
		dir, err := os.MkdirTemp("", "cove-bench-")
		if err != nil {
			b.Fatal(err)
		}
		defer os.RemoveAll(dir)
		cove := peers.StartCove(b, dir, "--origin-plain-http", origin.Addr)
		defer cove.Stop()
		if ownCPU {
			pin(b, cove.Pid(), "1")
		}
		gets0 := origin.BlobGETs()
		d := pullFresh(b, ctx, cove.URL, img)
		if misses := cove.Metric(b, "cove_requests_total", `operation="blob"`, `result="miss"`); int(misses) != len(blobs) {
			b.Fatalf("cold cove-cache counted %v blob misses, want %d", misses, len(blobs))
		}
		for i, n := range delta(gets0, origin.BlobGETs(), blobs) {
			if n != 1 {
				b.Fatalf("origin served blob %s %d times during one cold pull through cove-cache, want 1", blobs[i], n)
			}
		}
		waitFills(b, cove) // the commit (fsync, rename) ends before the next run
		return d
	}

	// Untimed warm-up of each side (the first start of each binary, page cache).
	coldPull()
	pullFresh(b, ctx, "", img)

	var viaCove, direct []time.Duration
	for range runs {
		viaCove = append(viaCove, coldPull())
		direct = append(direct, pullFresh(b, ctx, "", img))
	}
	mc, md := median(viaCove), median(direct)
	ratio := mc.Seconds() / md.Seconds()
	if ownCPU {
		b.Logf("cold-pull-own-cpu ratio cove/origin = %.3f (informative; cove-cache alone on CPU 1, everything else on CPU 0): cove %.2fs origin %.2fs (median of %d, %s)",
			ratio, mc.Seconds(), md.Seconds(), runs, sizeLabel(img))
	} else {
		b.Logf("cold-pull ratio cove/origin = %.3f (target <= 1.15, %s): cove %.2fs origin %.2fs (median of %d, %s, empty cove-cache and fresh containerd each)",
			ratio, verdict(ratio <= 1.15), mc.Seconds(), md.Seconds(), runs, sizeLabel(img))
	}
	b.Logf("  runs cove:   %s", list(viaCove))
	b.Logf("  runs origin: %s", list(direct))
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ratio, "cove/origin")
	b.ReportMetric(mc.Seconds(), "cove-s")
	b.ReportMetric(md.Seconds(), "origin-s")
}

// BenchmarkServeCachedBlob: GET of a cached 1 GiB blob from cove-cache against GET of the
// same blob from the distribution registry serving it from its own filesystem (the
// origin), both read to the end by this process. Target: cove-cache's throughput at
// least the registry's (ratio >= 1.0).
//
// It also reads cove-cache's peak RSS (VmHWM), which must not grow with blob size and
// stay under 100 MiB: after a cold fill of the 1 GiB blob (one process), then, in a new
// process over the same storage, after serving the small blob only and after serving the
// 1 GiB blob too.
func BenchmarkServeCachedBlob(b *testing.B) {
	logLoad(b)
	const repo = "team/blobs"
	origin := peers.StartRegistry(b)
	bigSize, smallSize := int64(bigBlobMiB)*mib, int64(smallBlobMiB)*mib
	big := pushBlob(b, origin.URL, repo, bigSize, 1)
	small := pushBlob(b, origin.URL, repo, smallSize, 2)
	ns := origin.Addr
	originBig := blobURL(origin.URL, repo, big, "")

	// Cold fills, in a process of their own: the small blob, then the large one, each
	// read to the end as it arrives. The origin's own GET of the large blob is the
	// anchor for the fill's time (informative, no target).
	cove := peers.StartCove(b, "", "--origin-plain-http", origin.Addr)
	getBlob(b, blobURL(cove.URL, repo, small, ns), smallSize)
	waitFills(b, cove)
	getBlob(b, originBig, bigSize) // page cache warm for both sides
	quiesce()
	fillTime := getBlob(b, blobURL(cove.URL, repo, big, ns), bigSize)
	waitFills(b, cove)
	quiesce()
	fillAnchor := getBlob(b, originBig, bigSize)
	hwmFill := peakRSS(b, cove.Pid())
	if misses := cove.Metric(b, "cove_requests_total", `operation="blob"`, `result="miss"`); misses != 2 {
		b.Fatalf("cove-cache counted %v blob misses for the two cold fills, want 2", misses)
	}

	// A new process over the now warm storage: the small blob first, then the large one.
	cove.Restart(b)
	coveSmall := blobURL(cove.URL, repo, small, ns)
	for range 20 {
		getBlob(b, coveSmall, smallSize)
	}
	hwmSmall := peakRSS(b, cove.Pid())

	coveBig := blobURL(cove.URL, repo, big, ns)
	getBlob(b, coveBig, bigSize) // warm-up of each side: connections, page cache
	getBlob(b, originBig, bigSize)
	var viaCove, direct []time.Duration
	for range gets {
		quiesce()
		viaCove = append(viaCove, getBlob(b, coveBig, bigSize))
		quiesce()
		direct = append(direct, getBlob(b, originBig, bigSize))
	}
	hwmBig := peakRSS(b, cove.Pid())
	if hits := cove.Metric(b, "cove_requests_total", `operation="blob"`, `result="hit"`); int(hits) != 20+1+gets {
		b.Fatalf("cove-cache counted %v blob hits, want %d: not every GET was served from the cache", hits, 20+1+gets)
	}
	var regHWM int64
	if pid := registryPid(origin); pid != 0 {
		regHWM = peakRSS(b, pid)
	}

	tput := func(ds []time.Duration) []float64 {
		out := make([]float64, len(ds))
		for i, d := range ds {
			out[i] = mibs(bigSize) / d.Seconds()
		}
		return out
	}
	tc, td := median(tput(viaCove)), median(tput(direct))
	ratio := tc / td
	b.Logf("cached-blob throughput ratio cove/registry = %.2f (target >= 1.0, %s): cove %.0f MiB/s registry %.0f MiB/s (median of %d GETs of a %d MiB blob)",
		ratio, verdict(ratio >= 1.0), tc, td, gets, bigBlobMiB)
	b.Logf("  runs cove (s):     %s", list(viaCove))
	b.Logf("  runs registry (s): %s", list(direct))
	limit := int64(100 * mib)
	b.Logf("cove-cache peak RSS (VmHWM, target < 100 MiB and flat in blob size, %s): serving %d MiB blob %.1f MiB, serving %d MiB blob %.1f MiB, after cold %d MiB fill %.1f MiB (registry serving it: %.1f MiB)",
		verdict(hwmSmall < limit && hwmBig < limit && hwmFill < limit && hwmBig < hwmSmall+16*mib),
		smallBlobMiB, mibs(hwmSmall), bigBlobMiB, mibs(hwmBig), bigBlobMiB, mibs(hwmFill), mibs(regHWM))
	b.Logf("cold %d MiB fill through cove %.2fs (%.0f MiB/s) vs the origin's own GET %.2fs (%.0f MiB/s): ratio %.2f (informative)",
		bigBlobMiB, fillTime.Seconds(), mibs(bigSize)/fillTime.Seconds(), fillAnchor.Seconds(), mibs(bigSize)/fillAnchor.Seconds(),
		fillTime.Seconds()/fillAnchor.Seconds())
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ratio, "cove/registry")
	b.ReportMetric(tc, "cove-MiB/s")
	b.ReportMetric(td, "registry-MiB/s")
	b.ReportMetric(mibs(hwmSmall), "hwm-small-MiB")
	b.ReportMetric(mibs(hwmBig), "hwm-big-MiB")
	b.ReportMetric(mibs(hwmFill), "hwm-fill-MiB")
}

// BenchmarkConcurrentColdPull: 8 fresh containerd instances pull one cold image at the same
// moment, through a cold cove-cache, and through a cold distribution registry in proxy
// mode (the anchor). The figure is the origin's blob GETs per blob: cove-cache should
// fetch each blob once and stream it to every waiter; distribution fetched it once per
// client in FIELD-NOTES. The time until all 8 are done is reported too (no target).
func BenchmarkConcurrentColdPull(b *testing.B) {
	logLoad(b)
	ctx := benchCtx(b)
	origin := peers.StartRegistry(b)
	img := peers.PushRandomImage(b, origin.Addr, "team/app:v1", layers, int64(layerMiB)*mib)
	blobs := allBlobs(img)

	// round runs one concurrent cold pull through a new cache at mirror, returns the time
	// until the last pull ended and the origin's blob GETs per blob.
	round := func(mirror string) (time.Duration, []int) {
		cs := make([]*peers.Containerd, nodes)
		for i := range cs {
			cs[i] = newNode(b, mirror)
		}
		defer func() {
			for _, c := range cs {
				dropNode(c)
			}
		}()
		gets0 := origin.BlobGETs()
		quiesce()
		var wg sync.WaitGroup
		errs := make([]error, len(cs))
		begin := make(chan struct{})
		start := time.Now()
		for i, c := range cs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-begin
				errs[i] = c.Pull(ctx, img.Ref)
			}()
		}
		close(begin)
		wg.Wait()
		d := time.Since(start)
		for i, err := range errs {
			if err != nil {
				b.Fatalf("node %d: %v", i, err)
			}
			checkTarget(b, ctx, cs[i], img)
		}
		return d, delta(gets0, origin.BlobGETs(), blobs)
	}
	viaCove := func() (time.Duration, []int) {
		dir, err := os.MkdirTemp("", "cove-bench-")
		if err != nil {
			b.Fatal(err)
		}
		defer os.RemoveAll(dir)
		cove := peers.StartCove(b, dir, "--origin-plain-http", origin.Addr)
		defer cove.Stop()
		d, gets := round(cove.URL)
		waitFills(b, cove)
		return d, gets
	}
	viaProxy := func() (time.Duration, []int) {
		px := peers.StartRegistry(b, peers.WithProxyRemote(origin.URL))
		defer func() {
			px.Stop()
			os.RemoveAll(px.Dir)
		}()
		return round(px.URL)
	}

	var coveT, proxyT []time.Duration
	var coveGets, proxyGets [][]int
	for range rounds {
		d, g := viaCove()
		coveT, coveGets = append(coveT, d), append(coveGets, g)
		d, g = viaProxy()
		proxyT, proxyGets = append(proxyT, d), append(proxyGets, g)
	}
	perBlob := func(gs [][]int) (mean float64, mx int) {
		var sum, n int
		for _, g := range gs {
			for _, v := range g {
				sum, n = sum+v, n+1
				mx = max(mx, v)
			}
		}
		return float64(sum) / float64(n), mx
	}
	cm, cmax := perBlob(coveGets)
	pm, pmax := perBlob(proxyGets)
	b.Logf("concurrent-cold-pull origin blob GETs per blob, %d nodes: cove %.2f (max %d) vs distribution proxy %.2f (max %d) (target: cove 1, %s; %d rounds per side, %s, %d blobs)",
		nodes, cm, cmax, pm, pmax, verdict(cmax == 1), rounds, sizeLabel(img), len(blobs))
	b.Logf("  per round, GETs per blob (config, layers...): cove %v proxy %v", coveGets, proxyGets)
	mc, mp := median(coveT), median(proxyT)
	b.Logf("concurrent-cold-pull time until all %d nodes are done, cove/proxy = %.2f: cove %.2fs proxy %.2fs (median of %d; runs cove %s, proxy %s) (informative)",
		nodes, mc.Seconds()/mp.Seconds(), mc.Seconds(), mp.Seconds(), rounds, list(coveT), list(proxyT))
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(cm, "cove-GETs/blob")
	b.ReportMetric(pm, "proxy-GETs/blob")
	b.ReportMetric(mc.Seconds()/mp.Seconds(), "cove/proxy-time")
}
