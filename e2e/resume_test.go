package e2e

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

// The origin connection of a cold fill drops in the middle of a layer: cove-cache asks
// the origin for the rest with one Range request, containerd's pull succeeds without a
// retry of its own, and the blob stored is the right one.
func TestColdPullResumesDroppedOriginConnection(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	cut := peers.StartCutProxy(t, origin.Addr, 3<<20)
	img := peers.PushRandomImage(t, cut.Addr, "team/app:v1", 2, 8<<20)
	if cut.Cut() {
		t.Fatal("the push was cut")
	}
	from := len(origin.Requests())
	cove := peers.StartCove(t, "", "--origin-plain-http", cut.Addr)
	ctrd := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := ctrd.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, ctrd, img)
	if !cut.Cut() {
		t.Fatal("no origin connection was cut")
	}

	// The origin saw one GET per blob, but for one layer: its GET, cut, and one ranged GET.
	gets := map[string][]int{}
	for _, q := range origin.Requests()[from:] {
		if q.Method == http.MethodGet && strings.Contains(q.Path, "/blobs/") {
			d := q.Path[strings.LastIndex(q.Path, "/")+1:]
			gets[d] = append(gets[d], q.Status)
		}
	}
	resumed := ""
	for _, d := range allBlobs(img) {
		switch st := gets[d]; {
		case len(st) == 1 && st[0] == http.StatusOK:
		case len(st) == 2 && st[0] == http.StatusOK && st[1] == http.StatusPartialContent && resumed == "":
			resumed = d
		default:
			t.Errorf("origin GETs of %s answered %v, want [200], or [200 206] for one layer", d, st)
		}
	}
	if resumed == "" {
		t.Fatal("no blob was resumed with a ranged GET")
	}
	if n := cove.Metric(t, "cove_fill_resumes_total", `result="ranged"`); n != 1 {
		t.Fatalf("cove_fill_resumes_total{result=ranged} = %v, want 1", n)
	}
	if n := cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="miss"`); n != float64(len(allBlobs(img))) {
		t.Fatalf("blob misses = %v, want %d (containerd did not retry)", n, len(allBlobs(img)))
	}

	// Every blob is stored, and verifies.
	deadline := time.Now().Add(30 * time.Second)
	for cove.Metric(t, "cove_fills_in_flight") > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	for _, d := range allBlobs(img) {
		dg := digest.Digest(d)
		got, err := fileDigest(filepath.Join(cove.StorageDir, "blobs", "sha256", dg.Encoded()))
		if err != nil || got != dg {
			t.Errorf("stored %s: digest %s, error %v", d, got, err)
		}
	}

	logged := 0
	for _, l := range cove.Logs(t) {
		if l["msg"] == "origin connection dropped mid-body: fill resumed" {
			logged++
			if l["digest"] != resumed || l["resumes"] != float64(1) {
				t.Errorf("resume logged as %v, want digest %s and 1 resume", l, resumed)
			}
		}
	}
	if logged != 1 {
		t.Fatalf("%d resume log lines, want 1", logged)
	}
}
