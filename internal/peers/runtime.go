package peers

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// ShimBinary is the runc shim hack/tools.sh builds into ToolsDir (containerd's
// io.containerd.runc.v2 runtime).
const ShimBinary = "containerd-shim-runc-v2"

// RuntimeOnPath makes containers runnable by the containerd instances this test starts
// afterwards: it checks that the shim is in ToolsDir and runc is installed, and puts
// ToolsDir first on the test process's PATH (t.Setenv, undone at cleanup), which
// containerd, ctr and the shims inherit through cleanEnv. containerd v2 looks the shim up
// on its PATH; the shim runs `runc` from its PATH. Not for parallel tests (t.Setenv).
func RuntimeOnPath(t testing.TB) {
	t.Helper()
	Bin(t, ShimBinary)
	t.Setenv("PATH", ToolsDir()+string(os.PathListSeparator)+os.Getenv("PATH"))
	if _, err := exec.LookPath("runc"); err != nil {
		t.Fatalf("peers: runc not on PATH (%v): run `make tools` (hack/tools.sh installs it with apt-get)", err)
	}
}

// Run runs cmd in a new container of the (pulled and unpacked) image ref with
// `ctr run --rm ref id cmd...`, waits for it to exit and returns its output. A command
// that exits non-zero fails the call. Call RuntimeOnPath before starting containerd.
func (c *Containerd) Run(ctx context.Context, ref, id string, cmd ...string) ([]byte, error) {
	out, err := c.ctr(ctx, append([]string{"run", "--rm", ref, id}, cmd...)...)
	if err != nil {
		return out, c.failure("ctr run "+ref+" "+id, out, err)
	}
	return out, nil
}

// RunnableMessage is what the entrypoint of PushRunnableImage prints.
const RunnableMessage = "cove-runnable-ok"

// RunnableEntrypoint is the path of the static program in PushRunnableImage's images.
const RunnableEntrypoint = "/bin/true"

// PushRunnableImage is PushRandomImage with one more layer, first (the base): a static
// Go program (CGO_ENABLED=0, built here once per call) at RunnableEntrypoint that prints
// RunnableMessage and exits 0, and that is the image's Cmd. The random layers follow it,
// so Layers[0] is the program's small layer and Size counts every layer.
func PushRunnableImage(t testing.TB, registryAddr, repoAndTag string, layers int, layerSize int64, opts ...PushOption) Image {
	t.Helper()
	dir := t.TempDir()
	prog := filepath.Join(dir, "true")
	src := filepath.Join(dir, "main.go")
	if err := os.WriteFile(src, []byte("package main\n\nimport \"os\"\n\nfunc main() { os.Stdout.WriteString(\""+RunnableMessage+"\\n\") }\n"), 0o644); err != nil {
		t.Fatalf("peers: %v", err)
	}
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", prog, src)
	build.Dir = dir
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH, "GOFLAGS=")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("peers: build the static entrypoint: %v\n%s", err, out)
	}
	base, err := writeFileLayer(filepath.Join(dir, "base.tar.gz"), prog, strings.TrimPrefix(RunnableEntrypoint, "/"))
	if err != nil {
		t.Fatalf("peers: base layer: %v", err)
	}

	return pushImage(t, dir, registryAddr, repoAndTag, RunnableEntrypoint, []*fileLayer{base}, layers, layerSize, opts)
}

// writeFileLayer writes a gzip tar layer holding the file src as member (mode 0755),
// with its parent directories.
func writeFileLayer(path, src, member string) (*fileLayer, error) {
	data, err := os.ReadFile(src)
	if err != nil {
		return nil, err
	}
	return writeLayer(path, gzip.DefaultCompression, func(tw *tar.Writer) error {
		var dirs []string
		for d := filepath.Dir(member); d != "." && d != "/"; d = filepath.Dir(d) {
			dirs = append([]string{d}, dirs...)
		}
		for _, d := range dirs {
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: time.Unix(0, 0)}); err != nil {
				return err
			}
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: member, Mode: 0o755, Size: int64(len(data)), ModTime: time.Unix(0, 0)}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	})
}
