package bench

import (
	"path/filepath"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// BenchmarkPush: `crane push` of an image (layers x layerMiB, a tarball on local disk)
// through cove-cache, which writes every request through to the origin and keeps the
// blobs on the way (spooled, verified, stored), against the same push straight to the
// origin. Each run pushes to a repository of its own, so every blob is uploaded again
// (crane checks blobs per repository); neither side rewrites a blob it holds already
// (the origin keeps its copy, cove-cache records provenance only), and what cove-cache
// commits in the background after a push is small and flushed by quiesce's sync before
// the next timed push. cove-cache routes crane's pushes to the origin as
// its --default-registry (a path element cannot carry the origin's port); crane logs in
// through cove-cache's token endpoint, anonymous. Target: ratio <= 1.10.
func BenchmarkPush(b *testing.B) {
	logLoad(b)
	src := peers.StartRegistry(b)
	img := peers.PushRandomImage(b, src.Addr, "src/app:v1", layers, int64(layerMiB)*mib)
	tar := filepath.Join(b.TempDir(), "image.tar")
	if out, err := peers.Crane(b, src.Addr, "", "", "pull", img.Ref, tar); err != nil {
		b.Fatalf("crane pull: %v: %s", err, out)
	}
	src.Stop()
	origin := peers.StartRegistry(b)
	cove := peers.StartCove(b, "", "--origin-plain-http", origin.Addr, "--default-registry", origin.Addr)

	push := func(host, repo string) time.Duration {
		quiesce()
		start := time.Now()
		if out, err := peers.Crane(b, host, "", "", "push", tar, host+"/"+repo+":v1"); err != nil {
			b.Fatalf("crane push to %s/%s: %v: %s", host, repo, err, out)
		}
		return time.Since(start)
	}
	// Untimed warm-up of each side.
	push(cove.Addr, "warm/cove")
	push(origin.Addr, "warm/origin")

	stored0 := cove.Metric(b, "cove_requests_total", `operation="upload"`, `result="passthrough"`)
	originPid := registryPid(origin)
	var viaCove, direct []time.Duration
	var coveCPU, originCPUVia, originCPUDirect time.Duration
	for i := range runs {
		c0, o0 := cpuTime(cove.Pid()), cpuTime(originPid)
		viaCove = append(viaCove, push(cove.Addr, "run/cove-"+strconv.Itoa(i)))
		c1, o1 := cpuTime(cove.Pid()), cpuTime(originPid)
		direct = append(direct, push(origin.Addr, "run/origin-"+strconv.Itoa(i)))
		o2 := cpuTime(originPid)
		coveCPU += c1 - c0
		originCPUVia += o1 - o0
		originCPUDirect += o2 - o1
	}
	// Every cove-side push went through it: at least one upload request per blob.
	if n := cove.Metric(b, "cove_requests_total", `operation="upload"`, `result="passthrough"`) - stored0; int(n) < runs*len(allBlobs(img)) {
		b.Fatalf("cove-cache relayed %v upload requests for %d pushes of %d blobs", n, runs, len(allBlobs(img)))
	}
	mc, md := median(viaCove), median(direct)
	ratio := mc.Seconds() / md.Seconds()
	b.Logf("push ratio cove/origin = %.3f (target <= 1.10, %s): cove %.2fs origin %.2fs (median of %d, crane push, %s)",
		ratio, verdict(ratio <= 1.10), mc.Seconds(), md.Seconds(), runs, sizeLabel(img))
	b.Logf("  runs cove:   %s", list(viaCove))
	b.Logf("  runs origin: %s", list(direct))
	b.Logf("  cove-cache peak RSS %.1f MiB (VmHWM; a push spools to disk, memory is flat in blob size)", mibs(peakRSS(b, cove.Pid())))
	b.Logf("  CPU per push: cove-cache %.2fs, origin %.2fs through cove-cache and %.2fs direct (the machine has %d CPUs)",
		coveCPU.Seconds()/float64(runs), originCPUVia.Seconds()/float64(runs), originCPUDirect.Seconds()/float64(runs), runtime.NumCPU())
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ratio, "cove/origin")
	b.ReportMetric(mc.Seconds(), "cove-s")
	b.ReportMetric(md.Seconds(), "origin-s")
}
