package peers

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// CoveBinary builds cmd/NAME (cove-cache, cove-node) from this checkout once per test
// binary and returns its path: end-to-end tests run the real program, kill -9 included.
func CoveBinary(t testing.TB, name string) string {
	t.Helper()
	buildOnce.Do(func() {
		// One directory per test process, named by its pid, so the next process can tell
		// a dead one's leftovers (test binaries have no exit hook to remove their own).
		removeStaleBuilds()
		buildDir = filepath.Join(os.TempDir(), "cove-bin-"+strconv.Itoa(os.Getpid()))
		if buildErr = os.MkdirAll(buildDir, 0o755); buildErr != nil {
			return
		}
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		for _, n := range []string{"cove-cache", "cove-node"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(buildDir, n), "./cmd/"+n)
			cmd.Dir = root
			if out, err := cmd.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("go build ./cmd/%s: %v\n%s", n, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatalf("peers: %v", buildErr)
	}
	return filepath.Join(buildDir, name)
}

// removeStaleBuilds deletes cove-bin-PID directories whose process is gone.
func removeStaleBuilds() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "cove-bin-*"))
	for _, d := range dirs {
		pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), "cove-bin-"))
		if err != nil {
			// The older random-suffix form: no pid to ask, so only when clearly stale.
			if fi, err := os.Stat(d); err == nil && time.Since(fi.ModTime()) > 2*time.Hour {
				os.RemoveAll(d)
			}
			continue
		}
		if syscall.Kill(pid, 0) == syscall.ESRCH {
			os.RemoveAll(d)
		}
	}
}

// Cove is a running cove-cache process.
type Cove struct {
	// Addr is 127.0.0.1:PORT; URL is http://Addr.
	Addr, URL string
	// StorageDir is the --storage-dir it runs on; a restart on the same dir keeps the cache.
	StorageDir string
	LogPath    string

	args     []string
	proc     *proc
	restarts int // StartAgain's count, for its log names
}

// StartCove runs cove-cache serve on a free loopback port over storageDir (a new temp dir
// when empty), with extra flags (for example --origin-plain-http ADDR), and stops it at
// cleanup.
func StartCove(t testing.TB, storageDir string, extra ...string) *Cove {
	t.Helper()
	if storageDir == "" {
		storageDir = t.TempDir()
	}
	c := &Cove{StorageDir: storageDir, args: extra}
	c.start(t)
	t.Cleanup(c.Stop)
	return c
}

func (c *Cove) start(t testing.TB) {
	t.Helper()
	c.proc, c.Addr, c.LogPath = startOnFreePort(t, "cove-cache", "cove-cache", 10*time.Second, readyClient, "http",
		"/readyz", func(addr string) []string {
			return append([]string{"serve", "--addr", addr, "--storage-dir", c.StorageDir, noDrain}, c.args...)
		})
	c.URL = "http://" + c.Addr
}

// readyClient polls plain-HTTP readiness endpoints; each try is bounded so a wedged
// process cannot hold the wait past its deadline.
var readyClient = &http.Client{Timeout: time.Second}

// startOnFreePort starts the cove binary name on a free loopback port (args builds its
// arguments from the address) and waits until scheme://ADDR/readyPath answers 200 with
// client. A port lost to another process between choosing and binding it is retried on
// another; any other failure fails the test with the tail of the log.
func startOnFreePort(t testing.TB, name, logName string, grace time.Duration, client *http.Client, scheme, readyPath string, args func(addr string) []string) (p *proc, addr, logPath string) {
	t.Helper()
	bin := CoveBinary(t, name)
	logDir := t.TempDir()
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatalf("peers: %v", err)
		}
		addr = "127.0.0.1:" + strconv.Itoa(port)
		logPath = filepath.Join(logDir, fmt.Sprintf("%s-%d.log", logName, attempt))
		p, err = startProc(name, bin, args(addr), cleanEnv(), logPath, logPath, grace)
		if err != nil {
			t.Fatalf("peers: start %s: %v", name, err)
		}
		if err := waitReady(p, client, scheme+"://"+addr+readyPath, 10*time.Second, false); err != nil {
			p.stop()
			lastErr = fmt.Errorf("%s did not become ready: %v\n%s", logName, err, logTail(logPath, 30))
			if strings.Contains(logTail(logPath, 5), "address already in use") {
				continue
			}
			break
		}
		return p, addr, logPath
	}
	t.Fatalf("peers: %v", lastErr)
	return nil, "", ""
}

// Stop ends cove-cache with SIGTERM (graceful), idempotently.
func (c *Cove) Stop() {
	if c.proc != nil {
		c.proc.stop()
	}
}

// Kill9 kills cove-cache at once, as a crash would, and waits for it to be gone.
func (c *Cove) Kill9() {
	if c.proc == nil {
		return
	}
	_ = syscall.Kill(-c.proc.cmd.Process.Pid, syscall.SIGKILL)
	<-c.proc.done
}

// Restart starts cove-cache again on the same storage directory and flags (a new port).
func (c *Cove) Restart(t testing.TB) {
	t.Helper()
	c.Stop()
	c.start(t)
}

// Pid is the process id (for peak-RSS readings).
func (c *Cove) Pid() int { return c.proc.cmd.Process.Pid }

// Metric returns the sum of every sample of the Prometheus metric name whose labels
// contain all of the given label="value" pairs.
func (c *Cove) Metric(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	resp, err := http.Get(c.URL + "/metrics")
	if err != nil {
		t.Fatalf("peers: metrics: %v", err)
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) || strings.HasPrefix(line, "#") {
			continue
		}
		rest := line[len(name):]
		if rest != "" && rest[0] != '{' && rest[0] != ' ' {
			continue // a longer metric name
		}
		ok := true
		for _, l := range labels {
			if !strings.Contains(rest, l) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		f := strings.Fields(rest[strings.LastIndex(rest, "}")+1:])
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}

// Logs returns cove-cache's log lines parsed as JSON objects (the default format).
func (c *Cove) Logs(t testing.TB) []map[string]any {
	t.Helper()
	f, err := os.Open(c.LogPath)
	if err != nil {
		t.Fatalf("peers: %v", err)
	}
	defer f.Close()
	var out []map[string]any
	dec := json.NewDecoder(f)
	for {
		var m map[string]any
		if err := dec.Decode(&m); err == io.EOF {
			break
		} else if err != nil {
			break
		}
		out = append(out, m)
	}
	return out
}

// Freeze stops cove-cache with SIGSTOP: it still accepts connections (the kernel does)
// but answers nothing, the way a wedged process or node behaves. Thaw resumes it.
func (c *Cove) Freeze() { _ = syscall.Kill(-c.proc.cmd.Process.Pid, syscall.SIGSTOP) }

// Thaw resumes a frozen cove-cache.
func (c *Cove) Thaw() { _ = syscall.Kill(-c.proc.cmd.Process.Pid, syscall.SIGCONT) }

// CoveNode is a running cove-node process.
type CoveNode struct {
	// Addr is 127.0.0.1:PORT of the resolver hook; URL is http://Addr, the mirror URL to
	// give containerd.
	Addr, URL string
	LogPath   string
	proc      *proc
}

// StartCoveNode runs cove-node serve on a free loopback port with the given cove-cache
// URLs and extra flags, and stops it at cleanup.
func StartCoveNode(t testing.TB, caches []string, extra ...string) *CoveNode {
	t.Helper()
	root := filepath.Join(t.TempDir(), "root")
	p, addr, logPath := startOnFreePort(t, "cove-node", "cove-node", 5*time.Second, readyClient, "http",
		"/healthz", func(addr string) []string {
			args := []string{"serve", "--addr", addr, "--root", root}
			for _, c := range caches {
				args = append(args, "--cache", c)
			}
			return append(args, extra...)
		})
	n := &CoveNode{Addr: addr, URL: "http://" + addr, LogPath: logPath, proc: p}
	t.Cleanup(n.Stop)
	return n
}

// Stop ends cove-node (SIGTERM), idempotently.
func (n *CoveNode) Stop() { n.proc.stop() }

// Metric sums the samples of a metric on cove-node's /metrics (see Cove.Metric).
func (n *CoveNode) Metric(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	return (&Cove{URL: n.URL}).Metric(t, name, labels...)
}
