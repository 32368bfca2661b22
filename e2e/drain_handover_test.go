package e2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
)

// The owner of a cold layer gets SIGTERM in the middle of its fill while bare
// containerds pull through the two other replicas (three replicas on one MinIO bucket,
// a throttled origin). The owner tells the others it is leaving: a containerd that
// starts pulling that layer after the SIGTERM streams it from the owner's fill (joined,
// not fetched again), and a second cold layer the owner would have owned is filled by
// the next owner, so the drain has nothing left to cut: the owner exits 0 within its
// bounds (--shutdown-grace 2s, --shutdown-timeout 13s), where it would otherwise have
// been filling a layer that takes longer than both. Every pull completes with every
// blob right, the origin sent each layer's bytes about once (< 1.5 times its size),
// and nothing corrupt is in the bucket.
func TestDrainHandsFillsOver(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	registry := peers.StartRegistry(t)
	const rate = 3 << 20
	slow := peers.StartRateLimitProxy(t, registry.Addr, rate)
	m := peers.StartMinIO(t)
	m.SetEnv(t)
	cr := peers.StartCoveReplicas(t, 3, "--origin-plain-http", slow.Addr, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket,
		"--shutdown-grace", "2s", "--shutdown-timeout", "13s")
	urls := replicaURLs(cr)

	// Layer a (32 MiB: 11 s from the origin) is half fetched when the owner gets
	// SIGTERM: about 5 s to go, well within the drain's 15 s. Layer b (56 MiB: 19 s, past
	// the owner's whole drain) has the same owner and is asked for after the SIGTERM.
	imgA := peers.PushRandomImage(t, registry.Addr, "team/drain-a:v1", 1, 32<<20)
	layerA := imgA.Layers[0]
	ownerURL := cluster.Owner(urls, layerA)
	var imgB peers.Image
	for i := 0; ; i++ {
		if i == 24 { // each push has a 1 in 3 chance: 24 misses in a row is (2/3)^24, 6e-5
			t.Fatal("no pushed layer has the owner of layer a")
		}
		imgB = peers.PushRandomImage(t, registry.Addr, fmt.Sprintf("team/drain-b:v%d", i), 1, 56<<20)
		if cluster.Owner(urls, imgB.Layers[0]) == ownerURL {
			break
		}
	}
	layerB := imgB.Layers[0]
	for _, img := range []*peers.Image{&imgA, &imgB} {
		img.Ref = strings.Replace(img.Ref, registry.Addr, slow.Addr, 1)
	}
	var owner *peers.Cove
	var stay []*peers.Cove
	for _, c := range cr.Replicas {
		if c.URL == ownerURL {
			owner = c
		} else {
			stay = append(stay, c)
		}
	}
	first := peers.StartContainerd(t, peers.WithMirror(stay[0].URL))
	late := peers.StartContainerd(t, peers.WithMirror(stay[1].URL))
	other := peers.StartContainerd(t, peers.WithMirror(stay[0].URL))
	before := len(registry.Requests())

	pulls := make(chan error, 3)
	pull := func(name string, c *peers.Containerd, img peers.Image) {
		go func() {
			if err := pullAndCheck(ctx, c, img); err != nil {
				pulls <- fmt.Errorf("%s: %w", name, err)
				return
			}
			pulls <- nil
		}()
	}
	pull("pull of a through a replica that stays", first, imgA)
	for deadline := time.Now().Add(90 * time.Second); owner.Metric(t, "cove_origin_bytes_total") < 16<<20; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the owner fetched nothing from the origin\n%s", replicaLogs(cr))
		}
	}
	if err := owner.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	sigterm := time.Now()
	t.Logf("SIGTERM to the owner %s mid-fill", owner.URL)
	pull("pull of a started after the SIGTERM", late, imgA)
	pull("pull of b started after the SIGTERM", other, imgB)

	code, err := owner.WaitExit(90 * time.Second)
	t.Logf("the owner exited %d (%v) %s after its SIGTERM", code, err, time.Since(sigterm).Round(100*time.Millisecond))
	if err != nil || code != 0 {
		t.Errorf("the owner exited %d, %v: its drain cut something in flight", code, err)
		b, _ := os.ReadFile(owner.LogPath)
		t.Log(string(b))
	}
	for range 3 {
		if err := <-pulls; err != nil {
			t.Errorf("%v\n%s", err, replicaLogs(cr))
		}
	}
	sent := map[string]int64{}
	gets := map[string]int{}
	for _, q := range registry.Requests()[before:] {
		if q.Method == "GET" && strings.Contains(q.Path, "/blobs/") {
			d := q.Path[strings.LastIndex(q.Path, "/")+1:]
			sent[d] += q.Bytes
			gets[d]++
		}
	}
	for _, l := range []struct {
		name, digest string
		size         int64
	}{{"a", layerA, 32 << 20}, {"b", layerB, 56 << 20}} {
		t.Logf("layer %s: %d origin GETs, %.2f times its size sent", l.name, gets[l.digest], float64(sent[l.digest])/float64(l.size))
		if sent[l.digest] >= l.size*3/2 {
			t.Errorf("layer %s: the origin sent %d bytes of a %d-byte layer (%d GETs), want < 1.5 times", l.name, sent[l.digest], l.size, gets[l.digest])
		}
	}
	joined := replicaMetric(t, stay, "cove_peer_handover_total", `result="joined"`)
	missed := replicaMetric(t, stay, "cove_peer_handover_total", `result="missed"`)
	t.Logf("offers to the leaving owner: %v joined its fill, %v found none (filled by the next owner)", joined, missed)
	if joined == 0 {
		t.Error("no replica joined the leaving owner's fill")
	}
	if missed == 0 {
		t.Error("no replica offered the leaving owner a blob it was not filling")
	}
	if t.Failed() {
		for _, q := range registry.Requests()[before:] {
			t.Logf("origin: %s %s %s %d, %d bytes", q.UserAgent, q.Method, q.Path, q.Status, q.Bytes)
		}
		logWarnings(t, stay[0].LogPath, stay[1].LogPath)
		return
	}
	waitObjects(t, ctx, m, append(allBlobs(imgA), allBlobs(imgB)...))
	checkBucketBlobs(t, ctx, m)
}
