package bench

import (
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// BenchmarkServeCachedBlobS3: GETs of a cached 1 GiB blob (COVE_BENCH_BLOB_MIB) from a
// cove-cache storing in S3 (a real MinIO on loopback) against the same GETs from a
// cove-cache on the filesystem backend, alternating, read to the end by this process.
// The S3 side pays for MinIO's own reads and a second HTTP hop on the same two cores, so
// its ratio is informative; its memory is the target: cove-cache's peak RSS (VmHWM), in a
// process started after the fills, stays under 100 MiB and flat in blob size (small blob
// only, then the 1 GiB blob too).
func BenchmarkServeCachedBlobS3(b *testing.B) {
	logLoad(b)
	const repo = "team/blobs"
	origin := peers.StartRegistry(b)
	bigSize, smallSize := int64(bigBlobMiB)*mib, int64(smallBlobMiB)*mib
	big := pushBlob(b, origin.URL, repo, bigSize, 1)
	small := pushBlob(b, origin.URL, repo, smallSize, 2)
	ns := origin.Addr
	m := peers.StartMinIO(b)
	m.SetEnv(b)
	fs := peers.StartCove(b, "", "--origin-plain-http", origin.Addr)
	s3 := peers.StartCove(b, "", "--origin-plain-http", origin.Addr, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket)

	// Cold fills on both sides, then new processes over the warm stores.
	var fillS3, commitS3 time.Duration
	for _, c := range []*peers.Cove{fs, s3} {
		getBlob(b, blobURL(c.URL, repo, small, ns), smallSize)
		d := getBlob(b, blobURL(c.URL, repo, big, ns), bigSize)
		start := time.Now()
		waitFills(b, c)
		if c == s3 {
			fillS3, commitS3 = d, time.Since(start)
		}
	}
	hwmFill := peakRSS(b, s3.Pid())
	fs.Restart(b)
	s3.Restart(b)

	for range 20 {
		getBlob(b, blobURL(s3.URL, repo, small, ns), smallSize)
	}
	hwmSmall := peakRSS(b, s3.Pid())
	urlFS, urlS3 := blobURL(fs.URL, repo, big, ns), blobURL(s3.URL, repo, big, ns)
	getBlob(b, urlFS, bigSize) // warm-up: connections, page caches
	getBlob(b, urlS3, bigSize)
	n := max(3, gets/3)
	var viaFS, viaS3 []time.Duration
	for range n {
		quiesce()
		viaS3 = append(viaS3, getBlob(b, urlS3, bigSize))
		quiesce()
		viaFS = append(viaFS, getBlob(b, urlFS, bigSize))
	}
	hwmBig, hwmFS, hwmMinIO := peakRSS(b, s3.Pid()), peakRSS(b, fs.Pid()), peakRSS(b, m.Pid())
	if hits := s3.Metric(b, "cove_requests_total", `operation="blob"`, `result="hit"`); int(hits) != 20+1+n {
		b.Fatalf("cove-cache on S3 counted %v blob hits, want %d: not every GET was served from the cache", hits, 20+1+n)
	}

	tput := func(ds []time.Duration) float64 {
		out := make([]float64, len(ds))
		for i, d := range ds {
			out[i] = mibs(bigSize) / d.Seconds()
		}
		return median(out)
	}
	ts, tf := tput(viaS3), tput(viaFS)
	b.Logf("cached-blob throughput S3/filesystem = %.2f (informative): S3 %.0f MiB/s, filesystem %.0f MiB/s (median of %d GETs of a %d MiB blob)",
		ts/tf, ts, tf, n, bigBlobMiB)
	b.Logf("  runs S3 (s):         %s", list(viaS3))
	b.Logf("  runs filesystem (s): %s", list(viaFS))
	limit := int64(100 * mib)
	b.Logf("cove-cache on S3 peak RSS (VmHWM, target < 100 MiB and flat in blob size, %s): serving %d MiB blob %.1f MiB, serving %d MiB blob %.1f MiB (cove-cache on filesystem %.1f MiB, MinIO %.1f MiB)",
		verdict(hwmSmall < limit && hwmBig < limit && hwmBig < hwmSmall+16*mib),
		smallBlobMiB, mibs(hwmSmall), bigBlobMiB, mibs(hwmBig), mibs(hwmFS), mibs(hwmMinIO))
	b.Logf("cold %d MiB fill into S3: %.2fs to the client's last byte (%.0f MiB/s), then %.2fs more to store it in S3 (informative); peak RSS after the fill %.1f MiB (target < 100 MiB, %s)",
		bigBlobMiB, fillS3.Seconds(), mibs(bigSize)/fillS3.Seconds(), commitS3.Seconds(), mibs(hwmFill), verdict(hwmFill < limit))
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ts/tf, "s3/fs")
	b.ReportMetric(ts, "s3-MiB/s")
	b.ReportMetric(tf, "fs-MiB/s")
	b.ReportMetric(mibs(hwmSmall), "hwm-small-MiB")
	b.ReportMetric(mibs(hwmBig), "hwm-big-MiB")
	b.ReportMetric(mibs(hwmFill), "hwm-fill-MiB")
}
