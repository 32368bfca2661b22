package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// buildImage runs hack/image.sh (what `make image` runs) with env, and returns its
// combined output and error.
func buildImage(t *testing.T, ctx context.Context, env ...string) (string, error) {
	t.Helper()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, filepath.Join(root, "hack", "image.sh"))
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "COVE_TOOLS="+filepath.Dir(peers.ToolsDir()))
	cmd.Env = append(cmd.Env, env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// imageConfig is the part of an OCI image config the manifests depend on.
type imageConfig struct {
	OS, Architecture string
	Config           struct {
		User, WorkingDir string
		Entrypoint, Cmd  []string
	}
}

func craneConfig(t *testing.T, registry, ref string) imageConfig {
	t.Helper()
	out, err := peers.Crane(t, registry, "", "", "config", ref)
	if err != nil {
		t.Fatalf("crane config %s: %v\n%s", ref, err, out)
	}
	var c imageConfig
	if err := json.Unmarshal([]byte(out), &c); err != nil {
		t.Fatalf("image config of %s: %v\n%s", ref, err, out)
	}
	return c
}

// The image `make image` builds without a container engine, pushed to a real registry and
// run in a real containerd (runc): both binaries answer `version` with the version it was
// stamped with, and `cove-cache serve` with the image's own command serves /healthz as
// uid 65532 on a read-only root filesystem, its storage the one writable mount at
// /var/lib/cove-cache, as the Deployment runs it. With BASE, the base's files stay.
func TestImageBuiltWithoutEngineRunsInContainerd(t *testing.T) {
	ctx := testCtx(t)
	peers.RuntimeOnPath(t)
	reg := peers.StartRegistry(t)
	version := fmt.Sprintf("v0.0.0-imagetest.%d", time.Now().UnixNano())

	t.Run("bad input", func(t *testing.T) {
		out, err := buildImage(t, ctx, "IMAGE=", "VERSION="+version)
		if err == nil || !strings.Contains(out, "IMAGE is not set") {
			t.Fatalf("hack/image.sh without IMAGE: err %v, output %q; want a failure naming IMAGE", err, out)
		}
		ref := reg.Addr + "/cove:nobase"
		out, err = buildImage(t, ctx, "IMAGE="+ref, "BASE="+reg.Addr+"/missing:v1", "VERSION="+version)
		if err == nil {
			t.Fatalf("hack/image.sh with a BASE that does not exist succeeded:\n%s", out)
		}
		if got, err := peers.Crane(t, reg.Addr, "", "", "digest", ref); err == nil {
			t.Fatalf("the failed build pushed %s (%s)", ref, got)
		}
	})

	ref := reg.Addr + "/cove:" + version
	out, err := buildImage(t, ctx, "IMAGE="+ref, "VERSION="+version)
	if err != nil {
		t.Fatalf("hack/image.sh: %v\n%s", err, out)
	}
	cfg := craneConfig(t, reg.Addr, ref)
	if cfg.OS != "linux" || cfg.Config.User != "65532:65532" ||
		strings.Join(cfg.Config.Entrypoint, " ") != "/usr/local/bin/cove-cache" || cfg.Config.WorkingDir != "/" {
		t.Fatalf("image config %+v: want linux, user 65532:65532, entrypoint /usr/local/bin/cove-cache, workdir /", cfg)
	}

	c := peers.StartContainerd(t)
	if err := c.Pull(ctx, ref); err != nil {
		t.Fatal(err)
	}
	for _, bin := range []string{"cove-cache", "cove-node"} {
		out, err := c.Run(ctx, ref, "version-"+bin, "/usr/local/bin/"+bin, "version")
		if err != nil {
			t.Fatal(err)
		}
		if got, want := lastLine(out), bin+" "+version; got != want {
			t.Errorf("%s version in the image printed %q, want %q", bin, got, want)
		}
	}

	t.Run("serve as non-root on a read-only root", func(t *testing.T) {
		serveReadOnly(t, ctx, c, ref)
	})

	t.Run("onto a base", func(t *testing.T) {
		base := peers.PushRunnableImage(t, reg.Addr, "base/run:v1", 0, 0)
		ref := reg.Addr + "/cove:" + version + "-based"
		if out, err := buildImage(t, ctx, "IMAGE="+ref, "BASE="+base.Ref, "VERSION="+version); err != nil {
			t.Fatalf("hack/image.sh with BASE: %v\n%s", err, out)
		}
		if err := c.Pull(ctx, ref); err != nil {
			t.Fatal(err)
		}
		out, err := c.Run(ctx, ref, "based-base", peers.RunnableEntrypoint)
		if err != nil || !strings.Contains(string(out), peers.RunnableMessage) {
			t.Fatalf("the base's %s in the image: %v, output %q", peers.RunnableEntrypoint, err, out)
		}
		out, err = c.Run(ctx, ref, "based-version", "/usr/local/bin/cove-node", "version")
		if err != nil || lastLine(out) != "cove-node "+version {
			t.Fatalf("cove-node version in the based image: %v, output %q", err, out)
		}
	})
}

// lastLine is the last line of ctr run's output: ctr prints its own warnings first
// (cgroup v1's deprecation on this machine), the container's output after them.
func lastLine(out []byte) string {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// serveReadOnly runs `cove-cache serve --storage-dir /var/lib/cove-cache` (the image's
// default command, on a free loopback port of the host's network) as the image's user,
// detached with `ctr run --read-only`, a host directory owned by 65532 bind-mounted at the
// storage path, and checks /healthz answers, the process's uid, and that its / is mounted
// read-only.
func serveReadOnly(t *testing.T, ctx context.Context, c *peers.Containerd, ref string) {
	spool := t.TempDir()
	if err := os.Chown(spool, 65532, 65532); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	const id = "serve-ro"
	t.Cleanup(func() {
		// Before containerd stops (cleanups run last-in first-out).
		cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, _ = c.RunCtr(cctx, "task", "kill", "--signal", "SIGKILL", id)
		for range 50 {
			if _, err := c.RunCtr(cctx, "task", "delete", id); err == nil || strings.Contains(err.Error(), "not found") {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		_, _ = c.RunCtr(cctx, "container", "delete", id)
	})
	if out, err := c.RunCtr(ctx, "run", "--detach", "--read-only", "--net-host",
		"--mount", "type=bind,src="+spool+",dst=/var/lib/cove-cache,options=rbind:rw",
		ref, id, "/usr/local/bin/cove-cache", "serve", "--addr="+addr, "--storage-dir=/var/lib/cove-cache"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			out, _ := c.RunCtr(ctx, "task", "ls")
			t.Fatalf("cove-cache serve in the image: no 200 from /healthz within 20 s (last: %v)\ntasks:\n%s", err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}

	pid := taskPID(t, ctx, c, id)
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) == 5 && (f[0] == "Uid:" || f[0] == "Gid:") {
			for _, id := range f[1:] {
				if id != "65532" {
					t.Errorf("cove-cache in the image runs with %s, want 65532 for every id", line)
					break
				}
			}
		}
	}
	if !rootReadOnly(t, pid) {
		t.Error("the container's / is not mounted read-only")
	}
	entries, err := os.ReadDir(spool)
	if err != nil || len(entries) == 0 {
		t.Errorf("cove-cache wrote nothing to its storage mount (%v): it did not use /var/lib/cove-cache", err)
	}
}

// taskPID is the host pid of the container task's process, from `ctr task ls`.
func taskPID(t *testing.T, ctx context.Context, c *peers.Containerd, id string) int {
	t.Helper()
	out, err := c.RunCtr(ctx, "task", "ls")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == id && f[2] == "RUNNING" {
			pid, err := strconv.Atoi(f[1])
			if err != nil {
				t.Fatalf("ctr task ls: pid %q: %v", f[1], err)
			}
			return pid
		}
	}
	t.Fatalf("no running task %s in ctr task ls:\n%s", id, out)
	return 0
}

// rootReadOnly reports whether / in pid's mount namespace is mounted ro (mountinfo's
// per-mount options, field 6).
func rootReadOnly(t *testing.T, pid int) bool {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		t.Fatal(err)
	}
	ro := false
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 5 && f[4] == "/" {
			ro = false // the last mount on / is the one the process sees
			for _, o := range strings.Split(f[5], ",") {
				ro = ro || o == "ro"
			}
		}
	}
	return ro
}
