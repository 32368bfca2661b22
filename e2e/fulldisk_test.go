package e2e

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

var originBlobPath = regexp.MustCompile(`/blobs/(sha256:[0-9a-f]{64})$`)

// originBlobGETs fails t unless every blob GET the origin saw since request index from
// came from cove-cache, and returns those GETs by digest.
func originBlobGETs(t *testing.T, origin *peers.Registry, from int) map[string][]peers.Request {
	t.Helper()
	got := map[string][]peers.Request{}
	for _, q := range origin.Requests()[from:] {
		m := originBlobPath.FindStringSubmatch(q.Path)
		if q.Method != http.MethodGet || m == nil {
			continue
		}
		if q.UserAgent != "cove-cache" {
			t.Errorf("origin served blob %s to %q, not to cove-cache: the client went round the cache", m[1][:19], q.UserAgent)
		}
		got[m[1]] = append(got[m[1]], q)
	}
	return got
}

// checkOriginBlobGETs fails t unless every blob GET the origin saw since request index
// from came from cove-cache, and each of want was fetched exactly once.
func checkOriginBlobGETs(t *testing.T, origin *peers.Registry, from int, want []string) {
	t.Helper()
	got := map[string]int{}
	for d, qs := range originBlobGETs(t, origin, from) {
		got[d] = len(qs)
	}
	for _, d := range want {
		if got[d] != 1 {
			t.Errorf("origin GETs of %s = %d, want 1", d[:19], got[d])
		}
		delete(got, d)
	}
	for d, n := range got {
		t.Errorf("origin served %s %d times, want 0", d[:19], n)
	}
}

// checkStore fails t unless every blob stored under dir matches its digest and no
// spool file is left once fills are done; it returns the digests stored.
func checkStore(t *testing.T, cove *peers.Cove) map[string]bool {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for cove.Metric(t, "cove_fills_in_flight") > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	stored := map[string]bool{}
	files, _ := filepath.Glob(filepath.Join(cove.StorageDir, "blobs", "sha256", "*"))
	for _, f := range files {
		d, err := fileDigest(f)
		if err != nil || d.Encoded() != filepath.Base(f) {
			t.Errorf("stored blob %s is corrupt: %s, %v", filepath.Base(f), d, err)
		}
		stored[d.String()] = true
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		entries, _ := os.ReadDir(filepath.Join(cove.StorageDir, "spool"))
		if len(entries) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("spool holds %d files after every fill ended", len(entries))
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return stored
}

func readyz(t *testing.T, cove *peers.Cove) (int, string) {
	t.Helper()
	resp, err := http.Get(cove.URL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func countLogs(t *testing.T, cove *peers.Cove, msg string) int {
	n := 0
	for _, l := range cove.Logs(t) {
		if l["msg"] == msg {
			n++
		}
	}
	return n
}

// A cove-cache whose storage is a 40 MiB tmpfs (20 MiB free) serves a cold 96 MiB, 4-layer image to
// containerd, with cove-cache alone as the mirror and through cove-node: every pull
// succeeds from cove-cache (the origin sees one GET per blob, each from cove-cache),
// nothing corrupt is stored, /readyz says the store is degraded, and once the tmpfs is
// grown the next pull stores every blob, without a restart.
func TestFullDiskPassThrough(t *testing.T) {
	for _, via := range []string{"cache", "node"} {
		t.Run(via, func(t *testing.T) {
			ctx := testCtx(t)
			var node *peers.CoveNode
			dir := peers.MountTmpfs(t, "size=40m")
			// A filler leaves 20 MiB: less than one 24 MiB layer, even once the failed
			// fills' spools are gone, so the store stays full until the tmpfs grows.
			if err := os.WriteFile(filepath.Join(dir, "filler"), make([]byte, 20<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			origin := peers.StartRegistry(t)
			img := peers.PushRandomImage(t, origin.Addr, "team/big:v1", 4, 24<<20)
			cove := peers.StartCove(t, dir, "--origin-plain-http", origin.Addr, "--log-level", "debug")
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("cove-cache log:\n%s", tail(cove.LogPath))
					if node != nil {
						t.Logf("cove-node log:\n%s", tail(node.LogPath))
					}
				}
			})
			mirror := cove.URL
			if via == "node" {
				node = peers.StartCoveNode(t, []string{cove.URL}, "--origin-plain-http", origin.Addr)
				mirror = node.URL
			}

			from := len(origin.Requests())
			c := peers.StartContainerd(t, peers.WithMirror(mirror))
			start := time.Now()
			if err := c.Pull(ctx, img.Ref); err != nil {
				t.Fatalf("pull with a full store: %v\ncove-cache log:\n%s", err, tail(cove.LogPath))
			}
			t.Logf("cold pull of %d MiB with a 40 MiB store took %s; cove-cache peak RSS %s", img.Size>>20, time.Since(start).Round(time.Millisecond), peakRSS(cove.Pid()))
			peers.CheckPulled(t, ctx, c, img)
			checkOriginBlobGETs(t, origin, from, allBlobs(img))
			if node != nil {
				if n := node.Metric(t, "cove_node_requests_total", `served_by="origin"`) + node.Metric(t, "cove_node_requests_total", `served_by="handoff"`); n != 0 {
					t.Errorf("cove-node served %v requests from the origin: cove-cache failed them", n)
				}
			}
			passed := cove.Metric(t, "cove_fills_passed_through_total")
			storeErrs := cove.Metric(t, "cove_fill_store_errors_total", `reason="no_space"`)
			t.Logf("fills passed through: %v, no-space store errors: %v, readers cut off: %v",
				passed, storeErrs, cove.Metric(t, "cove_passthrough_readers_cut_total"))
			if passed == 0 || storeErrs == 0 {
				t.Fatal("no fill passed through for want of space: the store was not full")
			}
			stored := checkStore(t, cove)
			unstored := 0
			for _, d := range allBlobs(img) {
				if !stored[d] {
					unstored++
				}
			}
			if unstored == 0 {
				t.Fatal("every blob was stored in a 40 MiB store")
			}
			if code, body := readyz(t, cove); code != http.StatusOK || !strings.Contains(body, "store degraded") || !strings.Contains(body, "no_space") {
				t.Fatalf("readyz while the store is full = %d %q", code, body)
			}
			if v := cove.Metric(t, "cove_store_degraded"); v != 1 {
				t.Fatalf("cove_store_degraded = %v while the store is full", v)
			}

			// Space returns: grow the tmpfs under the running cove-cache.
			peers.RemountTmpfs(t, dir, 0, "size=256m")
			from = len(origin.Requests())
			c2 := peers.StartContainerd(t, peers.WithMirror(mirror))
			start = time.Now()
			if err := c2.Pull(ctx, img.Ref); err != nil {
				t.Fatalf("pull after space returned: %v", err)
			}
			t.Logf("pull after space returned (storing) took %s", time.Since(start).Round(time.Millisecond))
			peers.CheckPulled(t, ctx, c2, img)
			var refetched []string
			for _, d := range allBlobs(img) {
				if !stored[d] {
					refetched = append(refetched, d)
				}
			}
			checkOriginBlobGETs(t, origin, from, refetched)
			stored = checkStore(t, cove)
			for _, d := range allBlobs(img) {
				if !stored[d] {
					t.Errorf("blob %s not stored after space returned", d[:19])
				}
			}
			if code, body := readyz(t, cove); code != http.StatusOK || body != "ok\n" {
				t.Fatalf("readyz after space returned = %d %q", code, body)
			}

			// Everything from the cache now: no origin blob GET at all.
			from = len(origin.Requests())
			c3 := peers.StartContainerd(t, peers.WithMirror(mirror))
			if err := c3.Pull(ctx, img.Ref); err != nil {
				t.Fatal(err)
			}
			peers.CheckPulled(t, ctx, c3, img)
			checkOriginBlobGETs(t, origin, from, nil)

			if n := countLogs(t, cove, "store cannot take blobs: passing fills through unstored until it can"); n != 1 {
				t.Errorf("entering the degraded condition logged %d times, want 1", n)
			}
			if n := countLogs(t, cove, "store takes blobs again"); n != 1 {
				t.Errorf("recovery logged %d times, want 1", n)
			}
			for _, d := range allBlobs(img) {
				if _, err := digest.Parse(d); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// peakRSS is a process's VmHWM from /proc, for the log.
func peakRSS(pid int) string {
	b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}
