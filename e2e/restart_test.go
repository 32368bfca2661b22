package e2e

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// activatedNode runs cove-node the way systemd runs a socket-activated service: the
// content socket is created and held by the caller and handed over as fd 3 with
// LISTEN_FDS=1 and LISTEN_PID set to the service's own pid.
type activatedNode struct {
	cmd *exec.Cmd
}

func startActivatedNode(t *testing.T, ln *net.UnixListener, addr, logPath string, args ...string) *activatedNode {
	t.Helper()
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	bin := peers.CoveBinary(t, "cove-node")
	// exec keeps the shell's pid, so LISTEN_PID=$$ names cove-node itself.
	cmd := exec.Command("/bin/sh", append([]string{"-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"`, bin, "serve", "--addr", addr}, args...)...)
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	n := &activatedNode{cmd: cmd}
	t.Cleanup(n.kill)
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			return n
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logPath)
			t.Fatalf("cove-node did not start: %v\n%s", err, b)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (n *activatedNode) kill() {
	if n.cmd.ProcessState == nil {
		_ = syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
		_ = n.cmd.Wait()
	}
}

// restart is what `systemctl restart` does: SIGTERM, wait for the process to exit (it
// drains its in-flight calls), then start the service again on the same socket.
func (n *activatedNode) stop() {
	if n.cmd.ProcessState == nil {
		_ = syscall.Kill(n.cmd.Process.Pid, syscall.SIGTERM)
		_ = n.cmd.Wait()
	}
}

// cove-node restarted (SIGTERM, as systemctl restart does) in the middle of a pull
// through its content hook, on the same socket-activated content socket: the pull
// completes with the right image. containerd's calls made while cove-node is down wait in
// the socket's backlog; calls in flight are drained before the old process exits.
//
// A crash (SIGKILL) at the wrong moment is not hidden: a content Write stream containerd
// has open (it opens a blob's writer before fetching the blob) breaks, and containerd
// does not retry it, so that pull fails and is retried by its caller (kubelet).
func TestContentHookRestartDuringPull(t *testing.T) {
	for _, killAfter := range []time.Duration{300 * time.Millisecond, 1200 * time.Millisecond} {
		t.Run(fmt.Sprintf("restart-after-%s", killAfter), func(t *testing.T) {
			ctx := testCtx(t)
			origin := peers.StartRegistry(t)
			img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 3, 8<<20)
			slow := throttle(t, origin.URL, 12<<20) // the pull takes about 2 s
			ref := slow + "/team/app:v1"
			cove := peers.StartCove(t, "", "--origin-plain-http", slow)

			root := filepath.Join(t.TempDir(), "root")
			sockDir, err := os.MkdirTemp("", "cvr-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(sockDir) })
			sock := filepath.Join(sockDir, "content.sock")
			ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ln.Close() })
			out, err := exec.Command(peers.CoveBinary(t, "cove-node"), "print-containerd-config", "--content-socket", sock).Output()
			if err != nil {
				t.Fatal(err)
			}
			fragment := filepath.Join(t.TempDir(), "cove-node.toml")
			if err := os.WriteFile(fragment, out, 0o644); err != nil {
				t.Fatal(err)
			}
			probe, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			addr := probe.Addr().String()
			probe.Close()
			logPath := filepath.Join(t.TempDir(), "cove-node.log")
			args := []string{"--cache", cove.URL, "--origin-plain-http", slow,
				"--content-socket", sock, "--content-root", filepath.Join(root, "io.containerd.content.v1.content")}

			node := startActivatedNode(t, ln, addr, logPath, args...)
			c := peers.StartContainerdWith(t, peers.ContainerdSetup{Root: root, Imports: []string{fragment}}, peers.WithMirror("http://"+addr))
			pulled := make(chan error, 1)
			go func() { pulled <- c.Pull(ctx, ref) }()
			time.Sleep(killAfter)
			start := time.Now()
			node.stop()
			t.Logf("old cove-node drained and exited in %s", time.Since(start).Round(time.Millisecond))
			start = time.Now()
			startActivatedNode(t, ln, addr, logPath, args...)
			t.Logf("cove-node back in %s", time.Since(start).Round(time.Millisecond))
			if err := <-pulled; err != nil {
				b, _ := os.ReadFile(logPath)
				t.Fatalf("pull across the restart: %v\ncove-node log:\n%s", err, b)
			}
			got, err := c.ImageTarget(ctx, ref)
			if err != nil || got != img.Digest {
				t.Fatalf("target %s, %v; want %s", got, err, img.Digest)
			}
			if err := c.ReadAllContent(ctx, ref); err != nil {
				t.Fatal(err)
			}
		})
	}
}
