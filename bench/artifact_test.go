package bench

import (
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// Settings of the artifact benchmarks (docs/benchmarks.md).
var (
	artifactMiB  = envInt("COVE_BENCH_ARTIFACT_MIB", 4096) // the artifact's one layer
	artifactRuns = envInt("COVE_BENCH_ARTIFACT_RUNS", 3)   // timed GETs per side
	wanMiBps     = envInt("COVE_BENCH_WAN_MIBPS", 32)      // each origin connection's limit, MiB/s
	fillParallel = envInt("COVE_BENCH_FILL_PARALLEL", 8)   // cove-cache --fill-parallel
	fillRangeMiB = envInt("COVE_BENCH_FILL_RANGE_MIB", 64) // cove-cache --fill-range-size
	artifactRepo = "ml/model"
)

// BenchmarkArtifact: a large artifact layer (4 GiB) read by one client through
// cove-cache against straight from the origin, on loopback with no limit: cold (a new
// cove-cache over empty storage each run: the fill streamed while it arrives) and warm
// (one cove-cache that holds it), with cove-cache's peak RSS. Targets: cold <= 1.15 and
// warm <= 1.05 (those of the image pulls), RSS flat in the blob's size (< 100 MiB).
func BenchmarkArtifact(b *testing.B) {
	logLoad(b)
	origin := peers.StartRegistry(b)
	size := int64(artifactMiB) * mib
	dgst := pushBlob(b, origin.URL, artifactRepo, size, 7)
	direct := blobURL(origin.URL, artifactRepo, dgst, "")
	getBlob(b, direct, size) // untimed: the origin's page cache

	coldRun := func() (time.Duration, int64) {
		cove, done := freshCove(b, "--origin-plain-http", origin.Addr)
		defer done()
		from := len(origin.Requests())
		quiesce()
		d := getBlob(b, blobURL(cove.URL, artifactRepo, dgst, origin.Addr), size)
		waitFills(b, cove)
		// The blob once, in one GET or (with parallel ranged fills) in several.
		if sent := originBlobBytes(origin, from, dgst); sent != size {
			b.Fatalf("the origin sent %d bytes of the %d-byte layer during one cold read through cove-cache, want one copy", sent, size)
		}
		return d, peakRSS(b, cove.Pid())
	}
	directRun := func() time.Duration { quiesce(); return getBlob(b, direct, size) }

	coldRun() // untimed warm-up of each side
	directRun()
	var cold, coldDirect []time.Duration
	var coldRSS []float64
	for range artifactRuns {
		d, rss := coldRun()
		cold, coldRSS = append(cold, d), append(coldRSS, mibs(rss))
		coldDirect = append(coldDirect, directRun())
	}

	warmCove := peers.StartCove(b, "", "--origin-plain-http", origin.Addr)
	warmURL := blobURL(warmCove.URL, artifactRepo, dgst, origin.Addr)
	getBlob(b, warmURL, size) // the fill
	waitFills(b, warmCove)
	getBlob(b, warmURL, size) // untimed warm-up
	gets0 := origin.BlobGETs()[dgst]
	var warm, warmDirect []time.Duration
	for range artifactRuns {
		quiesce()
		warm = append(warm, getBlob(b, warmURL, size))
		warmDirect = append(warmDirect, directRun())
	}
	if n := origin.BlobGETs()[dgst] - gets0; n != artifactRuns {
		b.Fatalf("origin served the layer %d times during %d direct and %d warm reads, want %d: a warm read went to the origin", n, artifactRuns, artifactRuns, artifactRuns)
	}
	warmRSS := mibs(peakRSS(b, warmCove.Pid()))

	rc := median(cold).Seconds() / median(coldDirect).Seconds()
	rw := median(warm).Seconds() / median(warmDirect).Seconds()
	maxRSS := max(warmRSS, median(coldRSS))
	for _, r := range coldRSS {
		maxRSS = max(maxRSS, r)
	}
	b.Logf("artifact cold ratio cove/origin = %.3f (target <= 1.15, %s): cove %.2fs origin %.2fs (median of %d, one %d MiB layer, a new cove-cache each run)",
		rc, verdict(rc <= 1.15), median(cold).Seconds(), median(coldDirect).Seconds(), artifactRuns, artifactMiB)
	b.Logf("artifact warm ratio cove/origin = %.3f (target <= 1.05, %s): cove %.2fs origin %.2fs (median of %d)",
		rw, verdict(rw <= 1.05), median(warm).Seconds(), median(warmDirect).Seconds(), artifactRuns)
	b.Logf("artifact cove-cache peak RSS = %.0f MiB (target < 100, %s): cold runs %s MiB, warm process %.0f MiB",
		maxRSS, verdict(maxRSS < 100), listF(coldRSS, "%.0f"), warmRSS)
	b.Logf("  runs cold cove:   %s", list(cold))
	b.Logf("  runs cold origin: %s", list(coldDirect))
	b.Logf("  runs warm cove:   %s", list(warm))
	b.Logf("  runs warm origin: %s", list(warmDirect))
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(rc, "cold-cove/origin")
	b.ReportMetric(rw, "warm-cove/origin")
	b.ReportMetric(maxRSS, "cove-peak-RSS-MiB")
}

// BenchmarkArtifactColdWAN: the same cold read when every origin connection is limited
// to COVE_BENCH_WAN_MIBPS (a RateLimitProxy, each connection on its own: across a WAN one
// TCP connection is bounded by its window and round trip, not by the link). cove-cache
// fills with parallel ranged GETs (--fill-parallel, --fill-range-size), each its own
// connection; the direct read is one GET through the same kind of limit, as a client
// reads a blob. Target: cove-cache faster than the direct read (ratio < 1).
func BenchmarkArtifactColdWAN(b *testing.B) {
	logLoad(b)
	requireFlag(b, "--fill-parallel", "--fill-range-size")
	origin := peers.StartRegistry(b)
	size := int64(artifactMiB) * mib
	dgst := pushBlob(b, origin.URL, artifactRepo, size, 7)
	getBlob(b, blobURL(origin.URL, artifactRepo, dgst, ""), size) // the origin's page cache
	rate := wanMiBps * mib

	coldRun := func() (time.Duration, int64, int64) {
		wan := peers.StartRateLimitProxy(b, origin.Addr, rate)
		defer wan.Stop()
		cove, done := freshCove(b, "--origin-plain-http", wan.Addr,
			"--fill-parallel", strconv.Itoa(fillParallel), "--fill-range-size", strconv.Itoa(fillRangeMiB*mib))
		defer done()
		from := len(origin.Requests())
		quiesce()
		d := getBlob(b, blobURL(cove.URL, artifactRepo, dgst, wan.Addr), size)
		waitFills(b, cove)
		if sent := originBlobBytes(origin, from, dgst); sent < size || sent > size+size/8 {
			b.Fatalf("the origin sent %d bytes of the %d-byte layer during one cold fill, want about one copy", sent, size)
		}
		return d, peakRSS(b, cove.Pid()), wan.Connections()
	}
	directRun := func() time.Duration {
		wan := peers.StartRateLimitProxy(b, origin.Addr, rate)
		defer wan.Stop()
		quiesce()
		return getBlob(b, blobURL("http://"+wan.Addr, artifactRepo, dgst, ""), size)
	}

	var cold, direct []time.Duration
	var rss []float64
	var conns []int64
	for range artifactRuns {
		d, r, c := coldRun()
		cold, rss, conns = append(cold, d), append(rss, mibs(r)), append(conns, c)
		direct = append(direct, directRun())
	}
	ratio := median(cold).Seconds() / median(direct).Seconds()
	b.Logf("artifact cold-WAN ratio cove/origin = %.3f (target < 1, %s): cove %.2fs origin %.2fs (median of %d, one %d MiB layer, %d MiB/s per origin connection, --fill-parallel %d --fill-range-size %d MiB)",
		ratio, verdict(ratio < 1), median(cold).Seconds(), median(direct).Seconds(), artifactRuns, artifactMiB, wanMiBps, fillParallel, fillRangeMiB)
	b.Logf("  one connection at the limit would take %.1fs; cove-cache opened %v origin connections per fill; peak RSS %s MiB",
		float64(size)/float64(rate), conns, listF(rss, "%.0f"))
	b.Logf("  runs cove:   %s", list(cold))
	b.Logf("  runs origin: %s", list(direct))
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ratio, "cove/origin")
	b.ReportMetric(median(cold).Seconds(), "cove-s")
	b.ReportMetric(median(direct).Seconds(), "origin-s")
}

// freshCove starts cove-cache over a new, empty storage directory; done stops it and
// deletes the directory (a cold fill of a 4 GiB blob leaves 4 GiB behind).
func freshCove(b testing.TB, args ...string) (*peers.Cove, func()) {
	b.Helper()
	dir, err := os.MkdirTemp("", "cove-bench-")
	if err != nil {
		b.Fatal(err)
	}
	cove := peers.StartCove(b, dir, args...)
	return cove, func() {
		cove.Stop()
		os.RemoveAll(dir)
	}
}

// originBlobBytes sums the body bytes the origin wrote for GETs of dgst since request
// number from of its log.
func originBlobBytes(origin *peers.Registry, from int, dgst string) int64 {
	var n int64
	for _, q := range origin.Requests()[from:] {
		if q.Method == http.MethodGet && strings.HasSuffix(q.Path, "/blobs/"+dgst) {
			n += q.Bytes
		}
	}
	return n
}

// requireFlag fails the benchmark at once, naming what is missing, when cove-cache serve
// does not know one of the flags (they come with parallel ranged fills).
func requireFlag(b testing.TB, flags ...string) {
	b.Helper()
	out, _ := exec.Command(peers.CoveBinary(b, "cove-cache"), "serve", "--help").CombinedOutput()
	for _, f := range flags {
		if !regexp.MustCompile(`(?m)^\s+-` + regexp.QuoteMeta(strings.TrimLeft(f, "-")) + `\b`).Match(out) {
			b.Fatalf("cove-cache serve has no %s flag: this benchmark needs parallel ranged fills (%s)", f, fmt.Sprint(flags))
		}
	}
}
