package bench

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
)

// scaleNodes is the number of fresh containerds of the scale-out cold pull.
var scaleNodes = envInt("COVE_BENCH_SCALEOUT_NODES", 6)

// BenchmarkScaleOutColdPull: scaleNodes fresh containerds pull one cold image at the same
// moment through three cove-cache replicas on one MinIO bucket (docs/scaleout.md), node i
// using replica i%3 as its mirror, against the same nodes all pulling through ONE
// cove-cache on the same MinIO (a fresh bucket each round on both sides), alternating
// round by round. The figure is the origin's blob GETs per blob through the replicas
// (target 1.0: a miss on a replica that does not own the blob goes to its owner, which
// fetches once); the time until all nodes are done, 3 replicas / 1, is informative.
func BenchmarkScaleOutColdPull(b *testing.B) {
	logLoad(b)
	ctx := benchCtx(b)
	origin := peers.StartRegistry(b)
	img := peers.PushRandomImage(b, origin.Addr, "team/app:v1", layers, int64(layerMiB)*mib)
	blobs := allBlobs(img)
	m := peers.StartMinIO(b)
	m.SetEnv(b)

	// One stream per cold blob on both sides, so that one origin GET is one fetch of a
	// whole blob (layers under --fill-parallel-min, 64 MiB, are one stream anyway).
	oneStream := []string{"--origin-plain-http", origin.Addr, "--fill-parallel", "1"}
	bucketN := 0
	newBucket := func() string {
		bucketN++
		name := fmt.Sprintf("scaleout-%d", bucketN)
		if err := m.MakeBucket(ctx, name); err != nil {
			b.Fatal(err)
		}
		return name
	}
	// round starts fresh containerds, node i with mirrors[i%len(mirrors)], pulls img on
	// all at once, and returns the time until the last pull ended and the origin's blob
	// GETs per blob.
	round := func(mirrors []string) (time.Duration, []int) {
		cs := make([]*peers.Containerd, scaleNodes)
		for i := range cs {
			cs[i] = newNode(b, mirrors[i%len(mirrors)])
		}
		defer func() {
			for _, c := range cs {
				dropNode(c)
			}
		}()
		gets0 := origin.BlobGETs()
		quiesce()
		d, errs := pullAllAtOnce(ctx, cs, img.Ref)
		for i, err := range errs {
			if err != nil {
				b.Fatalf("node %d (mirror %s): %v", i, mirrors[i%len(mirrors)], err)
			}
			checkTarget(b, ctx, cs[i], img)
		}
		return d, delta(gets0, origin.BlobGETs(), blobs)
	}
	viaReplicas := func() (time.Duration, []int, float64) {
		cr := peers.StartCoveReplicas(b, 3, slices.Concat(oneStream, []string{"--s3-endpoint", m.Endpoint, "--s3-bucket", newBucket()})...)
		defer func() {
			for _, c := range cr.Replicas {
				c.Stop()
				os.RemoveAll(c.StorageDir)
			}
		}()
		var urls []string
		for _, c := range cr.Replicas {
			urls = append(urls, c.URL)
		}
		d, gets := round(urls)
		var forwarded float64
		for _, c := range cr.Replicas {
			waitFills(b, c)
			forwarded += c.Metric(b, "cove_peer_forwarded_total", `to="owner"`)
		}
		return d, gets, forwarded
	}
	viaOne := func() (time.Duration, []int) {
		dir, err := os.MkdirTemp("", "cove-bench-")
		if err != nil {
			b.Fatal(err)
		}
		defer os.RemoveAll(dir)
		cove := peers.StartCove(b, dir, slices.Concat(oneStream, []string{"--s3-endpoint", m.Endpoint, "--s3-bucket", newBucket()})...)
		defer cove.Stop()
		d, gets := round([]string{cove.URL})
		waitFills(b, cove)
		return d, gets
	}

	var replT, oneT []time.Duration
	var replGets, oneGets [][]int
	var forwarded []float64
	for range rounds {
		d, g, fw := viaReplicas()
		replT, replGets, forwarded = append(replT, d), append(replGets, g), append(forwarded, fw)
		d, g = viaOne()
		oneT, oneGets = append(oneT, d), append(oneGets, g)
	}
	for i, fw := range forwarded {
		// Every node's mirror owns some blobs, not all (node i uses replica i%3): with
		// no miss forwarded, the replicas were not working as one cluster.
		if fw == 0 {
			b.Fatalf("round %d: no replica forwarded a miss to its owner", i)
		}
	}
	rm, rmax := getsPerBlob(replGets)
	om, omax := getsPerBlob(oneGets)
	b.Logf("scale-out cold pull, origin blob GETs per blob, %d nodes: 3 replicas %.2f (max %d) vs 1 cove-cache %.2f (max %d) (target: replicas 1.0, %s; %d rounds per side, %s, %d blobs; misses forwarded to owners per round %v)",
		scaleNodes, rm, rmax, om, omax, verdict(rmax == 1), rounds, sizeLabel(img), len(blobs), forwarded)
	b.Logf("  per round, GETs per blob (config, layers...): replicas %v, one %v", replGets, oneGets)
	mr, mo := median(replT), median(oneT)
	b.Logf("scale-out cold pull, time until all %d nodes are done, 3 replicas / 1 = %.2f: replicas %.2fs, one %.2fs (median of %d; runs replicas %s, one %s) (informative)",
		scaleNodes, mr.Seconds()/mo.Seconds(), mr.Seconds(), mo.Seconds(), rounds, list(replT), list(oneT))
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(rm, "replicas-GETs/blob")
	b.ReportMetric(om, "one-GETs/blob")
	b.ReportMetric(mr.Seconds()/mo.Seconds(), "replicas/one-time")
}

// pullAllAtOnce pulls ref on every containerd at the same moment and returns the time
// until the last pull ended and each pull's error.
func pullAllAtOnce(ctx context.Context, cs []*peers.Containerd, ref string) (time.Duration, []error) {
	var wg sync.WaitGroup
	errs := make([]error, len(cs))
	begin := make(chan struct{})
	for i, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-begin
			errs[i] = c.Pull(ctx, ref)
		}()
	}
	start := time.Now()
	close(begin)
	wg.Wait()
	return time.Since(start), errs
}

// getsPerBlob is the mean and the largest of the per-blob GET counts of every round.
func getsPerBlob(gs [][]int) (mean float64, mx int) {
	var sum, n int
	for _, g := range gs {
		for _, v := range g {
			sum, n = sum+v, n+1
			mx = max(mx, v)
		}
	}
	return float64(sum) / float64(n), mx
}

// scaleBlobMiB is the size of the cached blob of the non-owner hit benchmark.
var scaleBlobMiB = envInt("COVE_BENCH_SCALEOUT_BLOB_MIB", 512)

// BenchmarkScaleOutHitS3NonOwner: GETs of a cached blob (512 MiB,
// COVE_BENCH_SCALEOUT_BLOB_MIB) through a replica that does NOT own it, of three
// replicas on one MinIO bucket, against the same GETs from a single cove-cache on the
// filesystem backend, alternating, read to the end by this process. The blob is filled
// through its owner (and through the single cove-cache), so the serving replica reads it
// from the bucket as a hit and forwards nothing. The S3 side pays for MinIO's reads and
// a second HTTP hop on the same cores: the ratio is informative. The serving replica's
// peak RSS (VmHWM) must stay under 100 MiB, as a single cove-cache's does.
func BenchmarkScaleOutHitS3NonOwner(b *testing.B) {
	logLoad(b)
	const repo = "team/blobs"
	origin := peers.StartRegistry(b)
	size := int64(scaleBlobMiB) * mib
	dgst := pushBlob(b, origin.URL, repo, size, 3)
	ns := origin.Addr
	m := peers.StartMinIO(b)
	m.SetEnv(b)
	cr := peers.StartCoveReplicas(b, 3, "--origin-plain-http", origin.Addr, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket)
	fs := peers.StartCove(b, "", "--origin-plain-http", origin.Addr)
	var urls []string
	for _, c := range cr.Replicas {
		urls = append(urls, c.URL)
	}
	var owner, server *peers.Cove
	for _, c := range cr.Replicas {
		switch {
		case c.URL == cluster.Owner(urls, dgst):
			owner = c
		case server == nil:
			server = c
		}
	}
	if owner == nil || server == nil {
		b.Fatalf("no owner or no non-owner of %s among %v", dgst, urls)
	}

	// Cold fills: through the owner (stored in the bucket), and through the single
	// cove-cache on the filesystem.
	for _, c := range []*peers.Cove{owner, fs} {
		getBlob(b, blobURL(c.URL, repo, dgst, ns), size)
		waitFills(b, c)
	}
	filled := originBytes(origin, dgst)
	if filled < 2*size {
		b.Fatalf("the origin sent %d bytes of the blob for the two fills, want at least %d", filled, 2*size)
	}
	hwmStart := peakRSS(b, server.Pid())
	urlS3, urlFS := blobURL(server.URL, repo, dgst, ns), blobURL(fs.URL, repo, dgst, ns)
	getBlob(b, urlS3, size) // warm-up: connections, page caches
	getBlob(b, urlFS, size)
	n := max(3, gets/3)
	var viaS3, viaFS []time.Duration
	for range n {
		quiesce()
		viaS3 = append(viaS3, getBlob(b, urlS3, size))
		quiesce()
		viaFS = append(viaFS, getBlob(b, urlFS, size))
	}
	hwmServe, hwmFS, hwmMinIO := peakRSS(b, server.Pid()), peakRSS(b, fs.Pid()), peakRSS(b, m.Pid())
	if hits := server.Metric(b, "cove_requests_total", `operation="blob"`, `result="hit"`); int(hits) != n+1 {
		b.Fatalf("the non-owner replica counted %v blob hits, want %d: not every GET was a hit from the bucket", hits, n+1)
	}
	if fw := server.Metric(b, "cove_peer_forwarded_total"); fw != 0 {
		b.Fatalf("the non-owner replica forwarded %v requests: a hit must be read from the bucket", fw)
	}
	if sent := originBytes(origin, dgst) - filled; sent != 0 {
		b.Fatalf("the origin sent %d bytes of the blob after the fills: the GETs were not all served from the caches", sent)
	}

	tput := func(ds []time.Duration) float64 {
		out := make([]float64, len(ds))
		for i, d := range ds {
			out[i] = mibs(size) / d.Seconds()
		}
		return median(out)
	}
	ts, tf := tput(viaS3), tput(viaFS)
	b.Logf("cached-blob hit throughput, S3 through a non-owner replica / filesystem = %.2f (informative): S3 non-owner %.0f MiB/s, filesystem %.0f MiB/s (median of %d GETs of a %d MiB blob)",
		ts/tf, ts, tf, n, scaleBlobMiB)
	b.Logf("  runs S3 non-owner (s): %s", list(viaS3))
	b.Logf("  runs filesystem (s):   %s", list(viaFS))
	limit := int64(100 * mib)
	b.Logf("non-owner replica peak RSS (VmHWM, target < 100 MiB, %s): %.1f MiB after serving (%.1f MiB before the first GET); single cove-cache on filesystem %.1f MiB, MinIO %.1f MiB",
		verdict(hwmServe < limit), mibs(hwmServe), mibs(hwmStart), mibs(hwmFS), mibs(hwmMinIO))
	b.Logf("the two cold fills (parallel ranges, the default) took %d bytes from the origin for 2 x %d (informative)", filled, size)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ts/tf, "s3-nonowner/fs")
	b.ReportMetric(ts, "s3-nonowner-MiB/s")
	b.ReportMetric(tf, "fs-MiB/s")
	b.ReportMetric(mibs(hwmServe), "hwm-nonowner-MiB")
}

// originBytes is the bytes of blob dgst the origin sent, over every GET of it (a fill in
// parallel ranges is several GETs of one blob).
func originBytes(origin *peers.Registry, dgst string) int64 {
	var n int64
	for _, q := range origin.Requests() {
		if q.Method == http.MethodGet && strings.HasSuffix(q.Path, "/blobs/"+dgst) {
			n += q.Bytes
		}
	}
	return n
}
