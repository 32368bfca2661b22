// Package peers starts the real programs cove is tested against: a distribution registry
// (origin, or the reference pull-through proxy), containerd with ctr and crictl, and
// test images pushed with go-containerregistry.
//
// Every peer is a real process, never a mock, because the whole point of cove is to
// behave right under containerd's real request pattern (mirrors, ?ns=, Range requests,
// fallback), and only the real binaries show it. Each peer binds 127.0.0.1 on a free
// port, keeps its files in t.TempDir() directories, runs in its own process group, and
// is killed and reaped in t.Cleanup even when the test fails. Peers are also started
// with a parent-death signal, so a test binary killed by `go test -timeout` does not
// leave them running.
//
// The binaries come from hack/tools.sh (`make tools`); see Bin.
package peers

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// ToolsDir is where hack/tools.sh installs the peer binaries: $COVE_TOOLS/bin if
// COVE_TOOLS is set, else $HOME/.cache/cove-tools/bin. It mirrors the script's own
// default so tests and `make tools` agree without configuration.
func ToolsDir() string {
	if d := os.Getenv("COVE_TOOLS"); d != "" {
		return filepath.Join(d, "bin")
	}
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		home = "/root"
	}
	return filepath.Join(home, ".cache", "cove-tools", "bin")
}

// Bin returns the absolute path of the peer binary name (containerd, ctr, registry,
// crane, crictl) in ToolsDir. A missing binary fails the test with the fix, because
// a test that silently skips its real peers proves nothing.
func Bin(t testing.TB, name string) string {
	t.Helper()
	p := filepath.Join(ToolsDir(), name)
	st, err := os.Stat(p)
	if err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		t.Fatalf("peers: %s not found at %s: run `make tools` (hack/tools.sh) first", name, p)
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		t.Fatalf("peers: %v", err)
	}
	return abs
}

// proc is one peer process: started in its own process group so Stop can kill it and
// anything it forked, with stdout and stderr going to files the test can read.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string // combined log shown in errors; stderr for the registry

	done     chan struct{} // closed once Wait returned
	waitErr  error
	stopOnce sync.Once
	grace    time.Duration // SIGTERM to SIGKILL
}

// startProc starts bin with args. stdoutPath and stderrPath may be equal.
func startProc(name, bin string, args, env []string, stdoutPath, stderrPath string, grace time.Duration) (*proc, error) {
	stdout, err := os.OpenFile(stdoutPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	stderr := stdout
	if stderrPath != stdoutPath {
		stderr, err = os.OpenFile(stderrPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			stdout.Close()
			return nil, err
		}
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid: true,
		// Kill the peer if the test binary dies without running its cleanups (for
		// example on `go test -timeout`). Go does not retire OS threads in normal
		// operation, so the forking thread outlives the peer's useful life.
		Pdeathsig: syscall.SIGKILL,
	}
	err = cmd.Start()
	// The child holds its own copies of the descriptors.
	stdout.Close()
	if stderr != stdout {
		stderr.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, logPath: stderrPath, done: make(chan struct{}), grace: grace}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// exited reports whether the process has already ended, and how.
func (p *proc) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.waitErr
	default:
		return false, nil
	}
}

// stop sends SIGTERM to the process group, SIGKILL after the grace period, and waits
// for the process to be reaped. Safe to call many times and from cleanups.
func (p *proc) stop() {
	p.stopOnce.Do(func() {
		pgid := p.cmd.Process.Pid // Setpgid: pgid == pid
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(p.grace):
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-p.done
		}
		// Anything else left in the group (children that ignored SIGTERM).
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
	})
}

// logTail returns the last n lines of path, for error messages.
func logTail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.Join(lines, "\n    ")
}

// freePort asks the kernel for a free TCP port on 127.0.0.1. Another process could
// take it before the peer binds it; starters retry on that.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// shortTempDir makes a directory under /tmp with a short name, removed at cleanup.
// Unix socket paths are limited to 108 bytes and t.TempDir() paths include the test
// name, so sockets live here instead.
func shortTempDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", "cv-")
	if err != nil {
		t.Fatalf("peers: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(d) })
	return d
}

// cleanEnv is the environment for peers: the test's own, minus variables that would
// point a peer at the host's real configuration or at outside services.
func cleanEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(k, "REGISTRY_"), strings.HasPrefix(k, "OTEL_"),
			strings.HasPrefix(k, "CONTAINERD_"), strings.HasPrefix(k, "CONTAINER_RUNTIME_ENDPOINT"),
			strings.HasPrefix(k, "IMAGE_SERVICE_ENDPOINT"),
			k == "HTTP_PROXY", k == "HTTPS_PROXY", k == "http_proxy", k == "https_proxy",
			k == "NO_PROXY", k == "no_proxy", k == "ALL_PROXY", k == "all_proxy":
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// runTool runs a short-lived tool (ctr, crictl) to completion with its own process
// group, killing the whole group if ctx ends, and returns its combined output.
func runTool(ctx context.Context, bin string, args ...string) ([]byte, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = cleanEnv()
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return out.Bytes(), err
	case <-ctx.Done():
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return out.Bytes(), errors.Join(ctx.Err(), fmt.Errorf("%s killed", filepath.Base(bin)))
	}
}
