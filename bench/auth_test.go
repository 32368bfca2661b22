package bench

import (
	"fmt"
	"regexp"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// authRuns is the number of timed warm pulls per side of BenchmarkWarmAuthorizedPull.
var authRuns = envInt("COVE_BENCH_AUTH_RUNS", 5)

// BenchmarkWarmAuthorizedPull: a warm pull through cove-cache from an origin with Docker
// token authentication, by its tenant (`ctr image pull --user team-a:PASSWORD` of
// team-a/app), against a warm pull through the same cove-cache from an origin without
// authentication (an image of the same size), each by a fresh containerd. The ratio is
// what authorization costs on a hit: containerd's token dance (a 401 relayed by
// cove-cache, a token from the token service, the retry) and cove-cache's authorization
// checks at the origin with the client's token. Target: ratio <= 1.05.
func BenchmarkWarmAuthorizedPull(b *testing.B) {
	logLoad(b)
	ctx := benchCtx(b)
	authOrigin := peers.StartTokenOrigin(b, map[string]string{"team-a": "team-a-bench-pw"})
	pw := authOrigin.Passwords
	openOrigin := peers.StartRegistry(b)
	size := int64(layerMiB) * mib
	authImg := authOrigin.Push(b, "team-a/app:v1", layers, size)
	openImg := peers.PushRandomImage(b, openOrigin.Addr, "team-a/app:v1", layers, size)
	// One cove-cache for both origins: the two sides share the process, its storage and
	// the page cache, and differ only in the origin's authentication.
	cove := peers.StartCove(b, "", "--origin-plain-http", authOrigin.Addr, "--origin-plain-http", openOrigin.Addr)
	asTeamA := []string{"--user", "team-a:" + pw["team-a"]}

	authPull := func() time.Duration { return pullFresh(b, ctx, cove.URL, authImg, asTeamA...) }
	openPull := func() time.Duration { return pullFresh(b, ctx, cove.URL, openImg) }

	// Untimed: the pulls that fill the cache, and one warm-up pull of each side.
	authPull()
	openPull()
	waitFills(b, cove)
	authPull()
	openPull()

	authBlobs, openBlobs := allBlobs(authImg), allBlobs(openImg)
	authGets0, openGets0 := authOrigin.BlobGETs(), openOrigin.BlobGETs()
	authReqs0, openReqs0 := len(authOrigin.Requests()), len(openOrigin.Requests())
	tokens0 := len(authOrigin.Tokens.Issued())
	hits0 := cove.Metric(b, "cove_requests_total", `operation="blob"`, `result="hit"`)
	var authT, openT []time.Duration
	for range authRuns {
		authT = append(authT, authPull())
		openT = append(openT, openPull())
	}
	// Both sides must have been served by cove-cache: no blob GET reached either origin,
	// and cove-cache counted a hit per blob per pull.
	for _, side := range []struct {
		name   string
		origin *peers.Registry
		gets0  map[string]int
		blobs  []string
	}{{"authenticated", authOrigin.Registry, authGets0, authBlobs}, {"open", openOrigin, openGets0, openBlobs}} {
		for i, n := range delta(side.gets0, side.origin.BlobGETs(), side.blobs) {
			if n != 0 {
				b.Fatalf("%s origin served blob %s %d times during %d warm pulls through cove-cache, want 0: a pull fell back to the origin",
					side.name, side.blobs[i], n, authRuns)
			}
		}
	}
	wantHits := authRuns * (len(authBlobs) + len(openBlobs))
	if hits := cove.Metric(b, "cove_requests_total", `operation="blob"`, `result="hit"`) - hits0; int(hits) != wantHits {
		b.Fatalf("cove-cache blob hits = %v, want %d", hits, wantHits)
	}

	describe := func(reqs []peers.Request) string {
		byKind := map[string]int{}
		for _, r := range reqs {
			kind := "other"
			switch {
			case blobPathRE.MatchString(r.Path):
				kind = "blob"
			case manifestPathRE.MatchString(r.Path):
				kind = "manifest"
			}
			byKind[fmt.Sprintf("%s %s %d", r.Method, kind, r.Status)]++
		}
		return fmt.Sprint(byKind)
	}
	authReqs, openReqs := authOrigin.Requests()[authReqs0:], openOrigin.Requests()[openReqs0:]
	tokens := len(authOrigin.Tokens.Issued()) - tokens0

	ma, mo := median(authT), median(openT)
	ratio := ma.Seconds() / mo.Seconds()
	b.Logf("warm-authorized ratio auth/noauth = %.3f (target <= 1.05, %s): auth %.2fs noauth %.2fs (median of %d, %s, through cove-cache, fresh containerd each)",
		ratio, verdict(ratio <= 1.05), ma.Seconds(), mo.Seconds(), authRuns, sizeLabel(authImg))
	b.Logf("  runs auth:   %s", list(authT))
	b.Logf("  runs noauth: %s", list(openT))
	b.Logf("  origin requests per warm pull: auth %.1f, noauth %.1f (token requests per authorized pull %.1f; --authz-ttl 10s)",
		float64(len(authReqs))/float64(authRuns), float64(len(openReqs))/float64(authRuns), float64(tokens)/float64(authRuns))
	b.Logf("  origin requests over %d warm pulls, auth:   %s", authRuns, describe(authReqs))
	b.Logf("  origin requests over %d warm pulls, noauth: %s", authRuns, describe(openReqs))
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ratio, "auth/noauth")
	b.ReportMetric(ma.Seconds(), "auth-s")
	b.ReportMetric(mo.Seconds(), "noauth-s")
	b.ReportMetric(float64(len(authReqs))/float64(authRuns), "auth-origin-reqs/pull")
	b.ReportMetric(float64(len(openReqs))/float64(authRuns), "noauth-origin-reqs/pull")
}

var (
	blobPathRE     = regexp.MustCompile(`^/v2/.+/blobs/[^/]+$`)
	manifestPathRE = regexp.MustCompile(`^/v2/.+/manifests/[^/]+$`)
)
