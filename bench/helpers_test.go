package bench

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

const mib = 1 << 20

// Settings, each overridable from the environment (docs/benchmarks.md lists them).
var (
	runs         = envInt("COVE_BENCH_RUNS", 9)           // timed pulls per side (warm, cold)
	gets         = envInt("COVE_BENCH_GETS", 15)          // timed GETs per side of the large cached blob
	layers       = envInt("COVE_BENCH_LAYERS", 4)         // layers of the pull image
	layerMiB     = envInt("COVE_BENCH_LAYER_MIB", 48)     // MiB per layer
	bigBlobMiB   = envInt("COVE_BENCH_BLOB_MIB", 1024)    // the large cached blob
	smallBlobMiB = envInt("COVE_BENCH_SMALL_BLOB_MIB", 1) // the small cached blob
	nodes        = envInt("COVE_BENCH_NODES", 8)          // containerd instances in the concurrent pull
	rounds       = envInt("COVE_BENCH_ROUNDS", 3)         // rounds per side of the concurrent pull
)

func envInt(name string, def int) int {
	if v := os.Getenv(name); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			panic(fmt.Sprintf("%s=%q: want a positive integer", name, v))
		}
		return n
	}
	return def
}

func benchCtx(b testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	b.Cleanup(cancel)
	return ctx
}

func allBlobs(img peers.Image) []string { return append([]string{img.Config}, img.Layers...) }

// median of durations or ratios (0 for none), leaving xs in its order.
func median[T time.Duration | float64](xs []T) T {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// list formats durations in seconds, in run order.
func list(ds []time.Duration) string {
	parts := make([]string, len(ds))
	for i, d := range ds {
		parts[i] = fmt.Sprintf("%.2f", d.Seconds())
	}
	return strings.Join(parts, " ")
}

func listF(fs []float64, format string) string {
	parts := make([]string, len(fs))
	for i, f := range fs {
		parts[i] = fmt.Sprintf(format, f)
	}
	return strings.Join(parts, " ")
}

func verdict(met bool) string {
	if met {
		return "met"
	}
	return "MISSED"
}

// quiesce flushes dirty pages (what the previous run's containerd wrote) so that
// writeback does not land in the middle of the next timed run.
func quiesce() { syscall.Sync() }

// newNode starts a fresh containerd, so its content store and snapshots are empty,
// with mirror as its `_default` mirror ("" for none: it pulls straight from the origin).
func newNode(b testing.TB, mirror string) *peers.Containerd {
	b.Helper()
	if mirror == "" {
		return peers.StartContainerd(b)
	}
	return peers.StartContainerd(b, peers.WithMirror(mirror))
}

// dropNode stops a containerd and deletes what it stored, to keep the disk free.
func dropNode(c *peers.Containerd) {
	c.Stop()
	_ = os.RemoveAll(c.Root)
}

// pullFresh pulls img (fetch and unpack, `ctr image pull` with extraArgs, such as
// --user) with a fresh containerd and returns the wall time of the pull alone: starting
// and stopping containerd is not timed.
func pullFresh(b testing.TB, ctx context.Context, mirror string, img peers.Image, extraArgs ...string) time.Duration {
	b.Helper()
	c := newNode(b, mirror)
	defer dropNode(c)
	return timedPull(b, ctx, c, img, extraArgs...)
}

// timedPull flushes dirty pages, pulls img with c, checks what c recorded, and returns the
// wall time of the pull alone.
func timedPull(b testing.TB, ctx context.Context, c *peers.Containerd, img peers.Image, extraArgs ...string) time.Duration {
	b.Helper()
	quiesce()
	start := time.Now()
	if err := c.Pull(ctx, img.Ref, extraArgs...); err != nil {
		b.Fatal(err)
	}
	d := time.Since(start)
	checkTarget(b, ctx, c, img)
	return d
}

func checkTarget(b testing.TB, ctx context.Context, c *peers.Containerd, img peers.Image) {
	b.Helper()
	got, err := c.ImageTarget(ctx, img.Ref)
	if err != nil {
		b.Fatal(err)
	}
	if got != img.Digest {
		b.Fatalf("containerd recorded %s for %s, pushed %s", got, img.Ref, img.Digest)
	}
}

// delta returns after[d]-before[d] for each digest.
func delta(before, after map[string]int, digests []string) []int {
	out := make([]int, len(digests))
	for i, d := range digests {
		out[i] = after[d] - before[d]
	}
	return out
}

// status reads one field (in kB) of /proc/PID/status, in bytes.
func status(pid int, field string) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || k != field {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) != 2 || fs[1] != "kB" {
			return 0, fmt.Errorf("%s: unexpected %q", field, v)
		}
		n, err := strconv.ParseInt(fs[0], 10, 64)
		return n << 10, err
	}
	return 0, fmt.Errorf("/proc/%d/status has no %s", pid, field)
}

// peakRSS is the process's peak resident set size (VmHWM).
func peakRSS(b testing.TB, pid int) int64 {
	b.Helper()
	n, err := status(pid, "VmHWM")
	if err != nil {
		b.Fatal(err)
	}
	return n
}

// registryPid finds the registry process serving from r.Dir (peers keeps it unexported).
func registryPid(r *peers.Registry) int {
	ents, _ := os.ReadDir("/proc")
	want := filepath.Join(r.Dir, "config.yml")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(cmd), want) {
			return pid
		}
	}
	return 0
}

// randomReader is a deterministic stream of incompressible bytes.
func randomReader(seed uint64, size int64) io.Reader {
	var s [32]byte
	for i := range 4 {
		s[i] = byte(seed >> (8 * i))
	}
	return io.LimitReader(rand.NewChaCha8(s), size)
}

// pushBlob uploads size pseudo-random bytes to repo on the plain-HTTP registry at
// registryURL as one monolithic upload (POST, then PUT ?digest=), and returns the
// digest. The bytes are generated twice (hash, then upload), so nothing is staged on disk.
func pushBlob(b testing.TB, registryURL, repo string, size int64, seed uint64) string {
	b.Helper()
	h := sha256.New()
	if _, err := io.CopyBuffer(h, randomReader(seed, size), make([]byte, mib)); err != nil {
		b.Fatal(err)
	}
	dgst := "sha256:" + hex.EncodeToString(h.Sum(nil))
	resp, err := http.Post(registryURL+"/v2/"+repo+"/blobs/uploads/", "", nil)
	if err != nil {
		b.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		b.Fatalf("start upload: %s", resp.Status)
	}
	loc, err := resp.Request.URL.Parse(resp.Header.Get("Location"))
	if err != nil {
		b.Fatal(err)
	}
	q := loc.Query()
	q.Set("digest", dgst)
	loc.RawQuery = q.Encode()
	req, err := http.NewRequest(http.MethodPut, loc.String(), randomReader(seed, size))
	if err != nil {
		b.Fatal(err)
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		b.Fatalf("upload %d bytes: %s: %s", size, resp.Status, body)
	}
	return dgst
}

// blobClient is the client of the blob-serving benchmark: no transparent
// decompression, connections kept alive (the same for both sides).
var blobClient = &http.Client{Transport: &http.Transport{
	DisableCompression:  true,
	MaxIdleConnsPerHost: 4,
	ReadBufferSize:      256 << 10,
}}

// getBlob GETs u and reads the body to the end with a 1 MiB buffer, returning the
// time from sending the request to the last byte. It checks the status and length.
func getBlob(b testing.TB, u string, want int64) time.Duration {
	b.Helper()
	buf := make([]byte, mib)
	start := time.Now()
	resp, err := blobClient.Get(u)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	var n int64
	for {
		k, err := resp.Body.Read(buf)
		n += int64(k)
		if err == io.EOF {
			break
		}
		if err != nil {
			b.Fatalf("GET %s: after %d bytes: %v", u, n, err)
		}
	}
	d := time.Since(start)
	if resp.StatusCode != http.StatusOK || n != want {
		b.Fatalf("GET %s: %s, %d bytes, want 200 and %d bytes", u, resp.Status, n, want)
	}
	return d
}

// blobURL is the URL containerd would use for a blob: straight at the registry, or at a
// mirror with ?ns=<origin host>.
func blobURL(base, repo, dgst, ns string) string {
	u := base + "/v2/" + repo + "/blobs/" + dgst
	if ns != "" {
		u += "?ns=" + url.QueryEscape(ns)
	}
	return u
}

// waitFills waits until cove-cache has no fill in flight (the last one committed).
func waitFills(b testing.TB, c *peers.Cove) {
	b.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for c.Metric(b, "cove_fills_in_flight") != 0 {
		if time.Now().After(deadline) {
			b.Fatal("cove-cache fills still in flight after 2 minutes")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pin sets the CPU affinity of every thread of pid (taskset -a); threads and children
// created later inherit it.
func pin(b testing.TB, pid int, cpus string) {
	b.Helper()
	if out, err := exec.Command("taskset", "-a", "-p", "-c", cpus, strconv.Itoa(pid)).CombinedOutput(); err != nil {
		b.Fatalf("taskset -a -p -c %s %d: %v: %s", cpus, pid, err, out)
	}
}

// loadavg is the first three fields of /proc/loadavg: other work on the machine shows
// there, and these benchmarks share the machine with whatever else runs.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// logLoad logs the load average now and at the end of the benchmark.
func logLoad(b *testing.B) {
	start := loadavg()
	b.Cleanup(func() { b.Logf("  load average at start %s, at end %s (%d CPUs)", start, loadavg(), runtime.NumCPU()) })
}

func mibs(n int64) float64 { return float64(n) / mib }

func sizeLabel(img peers.Image) string {
	return fmt.Sprintf("%d-layer %.0f MiB image", len(img.Layers), mibs(img.Size))
}
