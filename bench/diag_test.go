package bench

// Diagnostics, not benchmarks: tests that only run with COVE_BENCH_DIAG=1 and print where
// the time and CPU of the figures in bench_test.go go. They are how docs/benchmarks.md's
// reading of the cold-pull figure was reached; rerun them after a change to the fill path.
//
//	COVE_BENCH_DIAG=1 go test -run TestDiag -v -count=1 ./bench/
//
// COVE_BENCH_PERF=DIR also records `perf record -g` of the processes named in each test
// into DIR/<name>.data (read with `perf report -i FILE --no-children --sort sym`), and
// COVE_BENCH_STORAGE=DIR puts the cold-pull diagnostic's cove-cache storage under DIR
// (for example /dev/shm, to take the disk out of the picture).

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// diagOnly skips a diagnostic unless COVE_BENCH_DIAG is set.
func diagOnly(t *testing.T) {
	t.Helper()
	if os.Getenv("COVE_BENCH_DIAG") == "" {
		t.Skip("diagnostic: set COVE_BENCH_DIAG=1")
	}
}

// diagRepo holds the large blob of the blob diagnostics.
const diagRepo = "team/blobs"

// diagBigBlobOrigin starts an origin holding a large blob (bigBlobMiB) in diagRepo.
func diagBigBlobOrigin(t testing.TB) (origin *peers.Registry, big string, size int64) {
	t.Helper()
	origin = peers.StartRegistry(t)
	size = int64(bigBlobMiB) * mib
	return origin, pushBlob(t, origin.URL, diagRepo, size, 1), size
}

// TestDiagColdFill: cold fills of the large blob through cove-cache (a new process over
// empty storage each round), read to the end by this process, against the origin's own
// GET, with cove-cache's CPU time during the fill and the time its commit (fsync,
// rename) takes after the last byte.
func TestDiagColdFill(t *testing.T) {
	diagOnly(t)
	origin, big, size := diagBigBlobOrigin(t)
	originBig := blobURL(origin.URL, diagRepo, big, "")
	getBlob(t, originBig, size)
	for i := range runs {
		dir := t.TempDir()
		cove := peers.StartCove(t, dir, "--origin-plain-http", origin.Addr)
		quiesce()
		stopPerf := perfRecord(t, fmt.Sprintf("fill-%d", i), cove.Pid())
		c0 := cpuTime(cove.Pid())
		fill := getBlob(t, blobURL(cove.URL, diagRepo, big, origin.Addr), size)
		fillDone := time.Now()
		fillCPU := cpuTime(cove.Pid()) - c0
		waitFills(t, cove)
		commit := time.Since(fillDone)
		commitCPU := settledCPU(cove.Pid()) - c0 - fillCPU
		stopPerf()
		quiesce()
		direct := getBlob(t, originBig, size)
		t.Logf("round %d (cove pid %d): cold fill %.2fs (%.0f MiB/s, cove CPU %.2fs), commit after last byte %.2fs (cove CPU %.2fs), origin GET %.2fs (%.0f MiB/s)",
			i, cove.Pid(), fill.Seconds(), mibs(size)/fill.Seconds(), fillCPU.Seconds(), commit.Seconds(), commitCPU.Seconds(), direct.Seconds(), mibs(size)/direct.Seconds())
		cove.Stop()
		os.RemoveAll(dir)
	}
}

// cpuTime is a process's user+system CPU time so far, from /proc/PID/stat.
func cpuTime(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	fs := strings.Fields(s[strings.LastIndex(s, ")")+2:])
	ut, _ := strconv.ParseInt(fs[11], 10, 64)
	st, _ := strconv.ParseInt(fs[12], 10, 64)
	return time.Duration(ut+st) * time.Second / 100 // USER_HZ
}

// machineBusy is the CPU time all cores spent not idle, from /proc/stat.
func machineBusy() time.Duration {
	b, _ := os.ReadFile("/proc/stat")
	line, _, _ := strings.Cut(string(b), "\n")
	fs := strings.Fields(line)[1:]
	var busy int64
	for i, f := range fs {
		n, _ := strconv.ParseInt(f, 10, 64)
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		busy += n
	}
	return time.Duration(busy) * time.Second / 100
}

func pidByArg(arg string) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(cmd), arg) {
			return pid
		}
	}
	return 0
}

// TestDiagColdPullCPU: where the CPU of a cold pull goes. The CPU time of cove-cache, the
// origin and containerd during a pull through an empty cove-cache and one straight from
// the origin, alternating, with the whole machine's busy time (other work included).
func TestDiagColdPullCPU(t *testing.T) {
	diagOnly(t)
	ctx := benchCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", layers, int64(layerMiB)*mib)
	opid := registryPid(origin)
	for i := range runs + 1 {
		for _, viaCove := range []bool{true, false} {
			mirror, cpid, done := "", 0, func() {}
			if viaCove {
				dir, err := os.MkdirTemp(os.Getenv("COVE_BENCH_STORAGE"), "cove-diag-")
				if err != nil {
					t.Fatal(err)
				}
				cove := peers.StartCove(t, dir, "--origin-plain-http", origin.Addr)
				mirror, cpid = cove.URL, cove.Pid()
				done = func() {
					waitFills(t, cove)
					cove.Stop()
					os.RemoveAll(dir)
				}
			}
			c := newNode(t, mirror)
			dpid := pidByArg(c.ConfigPath)
			quiesce()
			stopPerf := perfRecord(t, fmt.Sprintf("pull-%d-cove-%v", i, viaCove), cpid, dpid)
			c0, o0, d0, m0 := cpuTime(cpid), cpuTime(opid), cpuTime(dpid), machineBusy()
			start := time.Now()
			if err := c.Pull(ctx, img.Ref); err != nil {
				t.Fatal(err)
			}
			wall := time.Since(start)
			c1, o1, d1, m1 := cpuTime(cpid), cpuTime(opid), cpuTime(dpid), machineBusy()
			stopPerf()
			dropNode(c)
			done()
			if i == 0 {
				continue // warm-up
			}
			t.Logf("cove=%-5v wall %.2fs  CPU: cove %.2fs origin %.2fs containerd %.2fs, machine busy %.2fs of %.2fs",
				viaCove, wall.Seconds(), (c1 - c0).Seconds(), (o1 - o0).Seconds(), (d1 - d0).Seconds(), (m1 - m0).Seconds(), 2*wall.Seconds())
		}
	}
}

// perfRecord runs `perf record -g` on the given processes (0s are skipped) into
// $COVE_BENCH_PERF/<name>.data when that variable names a directory; the returned func
// stops it.
func perfRecord(t testing.TB, name string, pids ...int) func() {
	dir := os.Getenv("COVE_BENCH_PERF")
	var list []string
	for _, p := range pids {
		if p != 0 {
			list = append(list, strconv.Itoa(p))
		}
	}
	if dir == "" || len(list) == 0 {
		return func() {}
	}
	cmd := exec.Command("perf", "record", "-g", "-F", "2000", "-p", strings.Join(list, ","), "-o", filepath.Join(dir, name+".data"))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // perf attaches
	return func() {
		_ = cmd.Process.Signal(os.Interrupt)
		_ = cmd.Wait()
	}
}

// TestDiagColdPullTimeline: when each blob request of a cold pull starts and ends,
// relative to the pull's start, straight from the origin (the registry's own log) and
// through an empty cove-cache (its debug request log): it shows whether the extra time
// is in fetching or in unpacking.
func TestDiagColdPullTimeline(t *testing.T) {
	diagOnly(t)
	ctx := benchCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", layers, int64(layerMiB)*mib)
	pullFresh(t, ctx, "", img)
	for i := range 2 {
		cove := peers.StartCove(t, t.TempDir(), "--origin-plain-http", origin.Addr, "--log-level", "debug")
		c := newNode(t, cove.URL)
		quiesce()
		start := time.Now()
		if err := c.Pull(ctx, img.Ref); err != nil {
			t.Fatal(err)
		}
		wall := time.Since(start)
		dropNode(c)
		logBefore, _ := os.ReadFile(filepath.Join(origin.Dir, "registry.log"))
		dc := newNode(t, "")
		quiesce()
		dstart := time.Now()
		if err := dc.Pull(ctx, img.Ref); err != nil {
			t.Fatal(err)
		}
		direct := time.Since(dstart)
		dropNode(dc)
		logAfter, _ := os.ReadFile(filepath.Join(origin.Dir, "registry.log"))
		t.Logf("round %d: cold pull through cove %.3fs, direct %.3fs; the direct pull at the origin:", i, wall.Seconds(), direct.Seconds())
		for _, line := range strings.Split(string(logAfter[len(logBefore):]), "\n") {
			m := regLine.FindStringSubmatch(line)
			if m == nil || !strings.Contains(line, "response completed") {
				continue
			}
			ts, _ := time.Parse(time.RFC3339Nano, m[1])
			dur, _ := time.ParseDuration(regDur.FindStringSubmatch(line)[1])
			t.Logf("  start %+.3fs end %+.3fs %s", (ts.Sub(dstart) - dur).Seconds(), ts.Sub(dstart).Seconds(), strings.Join(regURI.FindStringSubmatch(line)[1:], " "))
		}
		t.Logf("through cove:")
		for _, l := range cove.Logs(t) {
			if l["msg"] != "request" {
				continue
			}
			ts, _ := time.Parse(time.RFC3339Nano, fmt.Sprint(l["time"]))
			dur, _ := time.ParseDuration(fmt.Sprint(l["duration"]))
			t.Logf("  start %+.3fs end %+.3fs %-4v %v %v %v bytes", (ts.Sub(start) - dur).Seconds(), ts.Sub(start).Seconds(), l["method"], l["path"], l["status"], l["bytes"])
		}
		cove.Stop()
	}
}

var (
	regLine = regexp.MustCompile(`^time="([^"]+)"`)
	regDur  = regexp.MustCompile(`http.response.duration="?([^" ]+)"?`)
	regURI  = regexp.MustCompile(`http.request.method=(\S+) .*http.request.uri="([^"]+)"`)
)

// TestDiagServe: GETs of the cached large blob from cove-cache and from the registry,
// alternating, with the CPU time of the server and of this client.
func TestDiagServe(t *testing.T) {
	diagOnly(t)
	origin, big, size := diagBigBlobOrigin(t)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	coveURL, originURL := blobURL(cove.URL, diagRepo, big, origin.Addr), blobURL(origin.URL, diagRepo, big, "")
	getBlob(t, coveURL, size)
	waitFills(t, cove)
	opid, self := registryPid(origin), os.Getpid()
	for i := range runs {
		for _, side := range []struct {
			name string
			url  string
			pid  int
		}{{"cove", coveURL, cove.Pid()}, {"registry", originURL, opid}} {
			quiesce()
			s0, c0 := cpuTime(side.pid), cpuTime(self)
			d := getBlob(t, side.url, size)
			t.Logf("%d %-8s %.3fs %5.0f MiB/s  server CPU %.2fs  client CPU %.2fs", i, side.name, d.Seconds(), mibs(size)/d.Seconds(),
				(cpuTime(side.pid) - s0).Seconds(), (cpuTime(self) - c0).Seconds())
		}
	}
}
