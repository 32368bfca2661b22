package content

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
)

// Environment of the helper mode: the test binary re-executed as a stand-alone content
// hook (so a test can kill and restart it like systemd restarts cove-node).
const (
	envServe  = "COVE_CONTENT_TEST_SERVE"
	envRoot   = "COVE_CONTENT_TEST_ROOT"
	envSocket = "COVE_CONTENT_TEST_SOCKET"
	// envHold makes the helper stop before it opens the store and serves: it prints
	// "held" and waits for a line on stdin (hookProc.release).
	envHold = "COVE_CONTENT_TEST_HOLD"
)

func TestMain(m *testing.M) {
	if os.Getenv(envServe) == "1" {
		os.Exit(serveMain())
	}
	os.Exit(m.Run())
}

// serveMain runs the hook until SIGTERM. It prints "ready activated=BOOL" on stdout
// once serving; with envHold, "held" first, and it serves only once a line comes on
// stdin.
func serveMain() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if os.Getenv(envHold) == "1" {
		fmt.Println("held")
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
			log.Error("held: stdin closed before the release", "error", err)
			return 1
		}
	}
	svc, err := New(Config{Root: os.Getenv(envRoot), Socket: os.Getenv(envSocket), Logger: log})
	if err != nil {
		log.Error("start", "error", err)
		return 1
	}
	fmt.Printf("ready activated=%v\n", svc.Activated())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	_ = svc.Close()
	return 0
}

const mib = 1 << 20

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// shortDir is a directory under /tmp for sockets (108-byte limit on their paths).
func shortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", "cvh-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// contentRoot is the built-in content plugin's directory under a containerd root.
func contentRoot(containerdRoot string) string {
	return filepath.Join(containerdRoot, BuiltinContentPlugin)
}

// fragmentFile writes Fragment(sock) as a drop-in and returns its path.
func fragmentFile(t testing.TB, sock string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "cove-content.toml")
	if err := os.WriteFile(p, []byte(Fragment(sock, runtime.GOARCH)), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// startHook serves the content hook in this process for a containerd whose root is
// containerdRoot, and stops it at cleanup.
func startHook(t testing.TB, containerdRoot, sock string) *Service {
	t.Helper()
	svc, err := New(Config{Root: contentRoot(containerdRoot), Socket: sock, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	return svc
}

// hooked is a containerd using an in-process content hook.
type hooked struct {
	c    *peers.Containerd
	svc  *Service
	root string
}

// startHooked starts the hook and a containerd configured with Fragment on root
// (a fresh one if empty).
func startHooked(t testing.TB, root string) hooked {
	t.Helper()
	if root == "" {
		root = filepath.Join(t.TempDir(), "root")
	}
	sock := filepath.Join(shortDir(t), "hook", "cove.sock")
	svc := startHook(t, root, sock)
	c := peers.StartContainerdWith(t, peers.ContainerdSetup{Root: root, Imports: []string{fragmentFile(t, sock)}})
	return hooked{c: c, svc: svc, root: root}
}

// checkPulled asserts the image's target, that every blob reads back intact, and that
// its layers were unpacked (one committed overlayfs snapshot per layer).
func checkPulled(t *testing.T, ctx context.Context, c *peers.Containerd, img peers.Image) {
	t.Helper()
	peers.CheckPulled(t, ctx, c, img)
	snaps := committedSnapshots(t, ctx, c)
	if snaps < len(img.Layers) {
		t.Fatalf("%d committed snapshots, want at least %d (one per layer of %s)", snaps, len(img.Layers), img.Ref)
	}
	unpacked, err := c.RunCtr(ctx, "image", "check", "name=="+img.Ref)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unpacked), "true") {
		t.Fatalf("ctr image check does not report %s unpacked:\n%s", img.Ref, unpacked)
	}
}

// committedSnapshots counts committed overlayfs snapshots.
func committedSnapshots(t *testing.T, ctx context.Context, c *peers.Containerd) int {
	t.Helper()
	out, err := c.RunCtr(ctx, "snapshots", "--snapshotter", "overlayfs", "ls")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[len(f)-1] == "Committed" {
			n++
		}
	}
	return n
}

// blobFile is where a blob lives in the store under containerd root.
func blobFile(root string, dgst string) string {
	d := digest.Digest(dgst)
	return filepath.Join(contentRoot(root), "blobs", d.Algorithm().String(), d.Encoded())
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// fetchBlob GETs a blob from the registry (plain HTTP).
func fetchBlob(t *testing.T, reg *peers.Registry, repo, dgst string) []byte {
	t.Helper()
	resp, err := http.Get(reg.URL + "/v2/" + repo + "/blobs/" + dgst)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET blob %s: %s", dgst, resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func descOf(b []byte) ocispec.Descriptor {
	return ocispec.Descriptor{Digest: digest.FromBytes(b), Size: int64(len(b))}
}

// hookProc is the content hook run as a separate process (this test binary in helper
// mode), started the way systemd socket activation starts a service: the listening
// socket is fd 3, LISTEN_FDS=1 and LISTEN_PID is the service's own pid (set by the
// shell right before it execs the binary, as systemd sets it in the forked child).
type hookProc struct {
	cmd      *exec.Cmd
	done     chan error
	lines    chan string // its stdout, line by line
	stdin    io.WriteCloser
	logPath  string
	killOnce sync.Once
}

// startActivated starts the hook process on ln and waits until it serves.
func startActivated(t *testing.T, ln *net.UnixListener, root, logPath string) *hookProc {
	t.Helper()
	p := startHookProc(t, ln, root, logPath, false)
	p.waitLine(t, "ready activated=true")
	return p
}

// startHeld starts the hook process on ln and waits until it is held: its process
// started (exec and package init, which take seconds on a loaded machine under -race),
// but it has not opened its store and nothing accepts on the socket until release.
func startHeld(t *testing.T, ln *net.UnixListener, root, logPath string) *hookProc {
	t.Helper()
	p := startHookProc(t, ln, root, logPath, true)
	p.waitLine(t, "held")
	return p
}

// release lets a held hook open its store and serve, and waits until it serves.
func (p *hookProc) release(t *testing.T) {
	t.Helper()
	if _, err := io.WriteString(p.stdin, "go\n"); err != nil {
		t.Fatalf("releasing the held hook: %v", err)
	}
	p.waitLine(t, "ready activated=true")
}

func startHookProc(t *testing.T, ln *net.UnixListener, root, logPath string, hold bool) *hookProc {
	t.Helper()
	f, err := ln.File() // a dup: the test keeps its own listener open, like systemd
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0"`, self)
	cmd.Env = append(os.Environ(), envServe+"=1", envRoot+"="+contentRoot(root),
		envSocket+"="+ln.Addr().String())
	if hold {
		cmd.Env = append(cmd.Env, envHold+"=1")
	}
	cmd.ExtraFiles = []*os.File{f} // fd 3
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &hookProc{cmd: cmd, done: make(chan error, 1), lines: make(chan string, 4), stdin: stdin, logPath: logPath}
	go func() {
		defer close(p.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.lines <- strings.TrimSpace(sc.Text())
		}
	}()
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(p.kill)
	return p
}

// waitLine waits for the hook process's next line on stdout and fails unless it is want.
func (p *hookProc) waitLine(t *testing.T, want string) {
	t.Helper()
	select {
	case line, ok := <-p.lines:
		if !ok || line != want {
			p.kill()
			b, _ := os.ReadFile(p.logPath)
			t.Fatalf("hook process said %q (stdout open %v), want %q; log:\n%s", line, ok, want, b)
		}
	case <-time.After(60 * time.Second):
		p.kill()
		t.Fatalf("hook process did not say %q within 60 s", want)
	}
}

// connQueued reports whether a connection waits in ln's accept queue (a listening
// socket polls readable then), without accepting it.
func connQueued(t *testing.T, ln *net.UnixListener) bool {
	t.Helper()
	rc, err := ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var queued bool
	var perr error
	if err := rc.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		var n int
		for n, perr = unix.Poll(fds, 0); perr == unix.EINTR; n, perr = unix.Poll(fds, 0) {
		}
		queued = n > 0 && fds[0].Revents&unix.POLLIN != 0
	}); err != nil {
		t.Fatal(err)
	}
	if perr != nil {
		t.Fatalf("poll of the hook's socket: %v", perr)
	}
	return queued
}

// kill sends SIGKILL and reaps the process. Idempotent.
func (p *hookProc) kill() {
	p.killOnce.Do(func() {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
		}
	})
}

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

func statMode(path string) (os.FileMode, error) {
	st, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return st.Mode().Perm(), nil
}

func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}
