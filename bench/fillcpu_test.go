package bench

import (
	"os"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// fillRuns is the number of cold fills per side of BenchmarkColdFillCPU.
var fillRuns = envInt("COVE_BENCH_FILL_RUNS", 3)

// BenchmarkColdFillCPU: the CPU a cold fill of the large blob (1 GiB) costs the cache,
// cove-cache against distribution in proxy mode doing the same work (fetch from the
// origin, store, stream to the client). Each run starts a new cache over empty storage,
// GETs the blob through it once, read to the end by this process, and counts the cache
// process's CPU time (user+system, /proc/PID/stat) from just before the GET until it has
// stored the blob and gone quiet. The sides alternate run by run; the figures are
// medians in CPU-seconds per GiB. Target: cove-cache <= 1.2 s/GiB.
func BenchmarkColdFillCPU(b *testing.B) {
	logLoad(b)
	origin, big, size := diagBigBlobOrigin(b)
	getBlob(b, blobURL(origin.URL, diagRepo, big, ""), size) // the origin's page cache
	gib := float64(size) / (1 << 30)

	coveRun := func() (cpu, wall time.Duration) {
		dir, err := os.MkdirTemp("", "cove-bench-")
		if err != nil {
			b.Fatal(err)
		}
		defer os.RemoveAll(dir)
		// One stream, as the proxy fetches it: the same work. (A fill in parallel ranges
		// hashes the blob back from the spool, which costs more CPU; it is for origins
		// far away, see BenchmarkArtifactColdWAN.)
		cove := peers.StartCove(b, dir, "--origin-plain-http", origin.Addr, "--fill-parallel", "1")
		defer cove.Stop()
		quiesce()
		gets0 := origin.BlobGETs()[big]
		c0 := cpuTime(cove.Pid())
		wall = getBlob(b, blobURL(cove.URL, diagRepo, big, origin.Addr), size)
		waitFills(b, cove)
		cpu = settledCPU(cove.Pid()) - c0
		if n := origin.BlobGETs()[big] - gets0; n != 1 {
			b.Fatalf("origin served the blob %d times during one cold fill through cove-cache, want 1", n)
		}
		if m := cove.Metric(b, "cove_requests_total", `operation="blob"`, `result="miss"`); m != 1 {
			b.Fatalf("cove-cache counted %v blob misses, want 1", m)
		}
		return cpu, wall
	}
	proxyRun := func() (cpu, wall time.Duration) {
		px := peers.StartRegistry(b, peers.WithProxyRemote(origin.URL))
		defer func() {
			px.Stop()
			os.RemoveAll(px.Dir)
		}()
		pid := registryPid(px)
		if pid == 0 {
			b.Fatal("proxy registry process not found")
		}
		quiesce()
		gets0 := origin.BlobGETs()[big]
		c0 := cpuTime(pid)
		wall = getBlob(b, blobURL(px.URL, diagRepo, big, ""), size)
		cpu = settledCPU(pid) - c0
		if n := origin.BlobGETs()[big] - gets0; n != 1 {
			b.Fatalf("origin served the blob %d times during one cold fill through the proxy, want 1", n)
		}
		return cpu, wall
	}

	coveRun() // untimed warm-up of each side
	proxyRun()
	var coveCPU, proxyCPU []float64
	var coveWall, proxyWall []time.Duration
	for range fillRuns {
		c, w := coveRun()
		coveCPU, coveWall = append(coveCPU, c.Seconds()/gib), append(coveWall, w)
		c, w = proxyRun()
		proxyCPU, proxyWall = append(proxyCPU, c.Seconds()/gib), append(proxyWall, w)
	}
	mc, mp := median(coveCPU), median(proxyCPU)
	b.Logf("cold-fill CPU cove = %.2f s/GiB (target <= 1.2, %s), distribution proxy %.2f s/GiB: ratio cove/proxy %.2f (median of %d cold %d MiB fills each)",
		mc, verdict(mc <= 1.2), mp, mc/mp, fillRuns, bigBlobMiB)
	b.Logf("  runs cove (CPU-s/GiB):  %s; to the client's last byte (s): %s", listF(coveCPU, "%.2f"), list(coveWall))
	b.Logf("  runs proxy (CPU-s/GiB): %s; to the client's last byte (s): %s", listF(proxyCPU, "%.2f"), list(proxyWall))
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(mc, "cove-CPU-s/GiB")
	b.ReportMetric(mp, "proxy-CPU-s/GiB")
	b.ReportMetric(mc/mp, "cove/proxy")
}

// settledCPU waits until pid's CPU time stops growing (the cache finished storing what
// it fetched: commit, fsync) and returns it.
func settledCPU(pid int) time.Duration {
	last := cpuTime(pid)
	for range 50 {
		time.Sleep(100 * time.Millisecond)
		now := cpuTime(pid)
		if now == last {
			return now
		}
		last = now
	}
	return last
}
