package content

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
	digest "github.com/opencontainers/go-digest"
)

// ctr image pull (transfer service) and crictl pull (CRI, transfer service by default)
// store content through the hook and unpack through its differ.
func TestPullThroughHook(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 2*time.Minute)
	reg := peers.StartRegistry(t)
	a := peers.PushRandomImage(t, reg.Addr, "team/a:v1", 3, 1*mib)
	b := peers.PushRandomImage(t, reg.Addr, "team/b:v1", 2, 1*mib)
	loc := peers.PushRandomImage(t, reg.Addr, "team/local:v1", 2, 1*mib)
	h := startHooked(t, "")

	dump, err := h.c.DumpConfig(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`'io.containerd.content.v1.content'`, `differ = 'cove-diff'`, `[proxy_plugins.cove]`, `[proxy_plugins.cove-diff]`,
		`default = ['cove-diff', 'walking']`,
		`config_path = '` + h.c.HostsDir + `'`, // the root config's own transfer keys survive the merge
	} {
		if !strings.Contains(dump, want) {
			t.Errorf("merged config lacks %s:\n%s", want, dump)
		}
	}
	plugins, err := h.c.RunCtr(ctx, "plugins", "ls")
	if err != nil {
		t.Fatal(err)
	}
	if hasRow(string(plugins), []string{"io.containerd.content.v1", "content"}) {
		t.Errorf("the built-in content plugin is loaded:\n%s", plugins)
	}
	for _, want := range [][]string{
		{"io.containerd.content.v1", "cove"},
		{"io.containerd.differ.v1", "cove-diff"},
	} {
		if !pluginOK(string(plugins), want[0], want[1]) {
			t.Errorf("ctr plugins ls: %s %s not ok:\n%s", want[0], want[1], plugins)
		}
	}

	if err := h.c.Pull(ctx, a.Ref); err != nil {
		t.Fatal(err)
	}
	checkPulled(t, ctx, h.c, a)
	if got := h.svc.Stats().Applies; got != int64(len(a.Layers)) {
		t.Errorf("ctr pull: %d Apply calls on the hook, want %d (one per layer)", got, len(a.Layers))
	}

	if err := h.c.CrictlPull(ctx, b.Ref); err != nil {
		t.Fatal(err)
	}
	checkPulled(t, ctx, h.c, b)
	if got := h.svc.Stats().Applies; got != int64(len(a.Layers)+len(b.Layers)) {
		t.Errorf("after crictl pull: %d Apply calls on the hook, want %d", got, len(a.Layers)+len(b.Layers))
	}
	// A client-side unpack (ctr --local; also nerdctl and CRI with use_local_image_pull)
	// goes through containerd's diff service, whose default order puts the hook first.
	if err := h.c.Pull(ctx, loc.Ref, "--local"); err != nil {
		t.Fatal(err)
	}
	checkPulled(t, ctx, h.c, loc)
	if got, want := h.svc.Stats().Applies, int64(len(a.Layers)+len(b.Layers)+len(loc.Layers)); got != want {
		t.Errorf("after ctr pull --local: %d Apply calls on the hook, want %d", got, want)
	}
	for _, l := range append(a.Layers, b.Layers...) {
		if !exists(blobFile(h.root, l)) {
			t.Errorf("layer %s not in the store's directory", l)
		}
	}
	if st := h.svc.Stats(); st.ApplyErrors != 0 {
		t.Errorf("stats %+v", st)
	}
}

// pluginOK reports whether `ctr plugins ls` lists the plugin with status ok.
func pluginOK(out, typ, id string) bool {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == typ && f[1] == id && f[len(f)-1] == "ok" {
			return true
		}
	}
	return false
}

// hasRow reports whether some line of out has the fields want, in order, as
// consecutive columns.
func hasRow(out string, want []string) bool {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		for i := 0; i+len(want) <= len(f); i++ {
			ok := true
			for j := range want {
				if f[i+j] != want[j] {
					ok = false
					break
				}
			}
			if ok {
				return true
			}
		}
	}
	return false
}

// A compare (`ctr snapshots diff`, the path of commits) goes to the hook first (the
// diff service's default order), falls back to the built-in walking differ while the
// hook has no containerd address, and with one produces a layer that containerd's own
// content store serves (it was written in the caller's namespace and lease).
func TestDiffThroughHook(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t, 2*time.Minute)
	reg := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, reg.Addr, "team/diff:v1", 2, 1*mib)
	h := startHooked(t, "")
	if err := h.c.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	key := topSnapshot(t, ctx, h.c)

	// No containerd address: Unimplemented, and containerd's walking differ answers.
	checkLayerTar(t, snapshotDiff(t, ctx, h.c, key), "cove/layer-1.bin", 1*mib)
	if got := h.svc.Stats().Diffs; got != 0 {
		t.Fatalf("%d diffs computed by the hook without containerd's address", got)
	}

	h.svc.Differ().setContainerdAddress(h.c.Address)
	layer := snapshotDiff(t, ctx, h.c, key)
	checkLayerTar(t, layer, "cove/layer-1.bin", 1*mib)
	if got := h.svc.Stats().Diffs; got != 1 {
		t.Fatalf("%d diffs computed by the hook, want 1", got)
	}
	// containerd does not forward the caller's lease to a proxy differ; the layer is
	// held by the hook's own expiring lease, so a GC now keeps it.
	gcNow(t, ctx, h.c)
	if _, err := h.c.RunCtr(ctx, "content", "get", digest.FromBytes(layer).String()); err != nil {
		t.Fatalf("the computed layer did not survive a GC: %v", err)
	}
	out, err := h.c.RunCtr(ctx, "leases", "ls")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "io.cove.node/diff=") || !strings.Contains(string(out), "containerd.io/gc.expire=") {
		t.Fatalf("no expiring cove diff lease:\n%s", out)
	}
}

// gcNow runs containerd's garbage collection and waits for it: deleting a lease with
// --sync schedules a collection and waits for it (core/leases SynchronousDelete).
func gcNow(t *testing.T, ctx context.Context, c *peers.Containerd) {
	t.Helper()
	out, err := c.RunCtr(ctx, "leases", "create")
	if err != nil {
		t.Fatal(err)
	}
	id := lastLine(string(out))
	if _, err := c.RunCtr(ctx, "leases", "delete", "--sync", id); err != nil {
		t.Fatal(err)
	}
}

// lastLine is the last non-empty line of s, trimmed (ctr may print warnings first).
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// topSnapshot is the committed snapshot no other snapshot has as parent.
func topSnapshot(t *testing.T, ctx context.Context, c *peers.Containerd) string {
	t.Helper()
	out, err := c.RunCtr(ctx, "snapshots", "--snapshotter", "overlayfs", "ls")
	if err != nil {
		t.Fatal(err)
	}
	parents := map[string]bool{}
	var committed []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || f[len(f)-1] != "Committed" {
			continue
		}
		committed = append(committed, f[0])
		if len(f) == 3 {
			parents[f[1]] = true
		}
	}
	for _, k := range committed {
		if !parents[k] {
			return k
		}
	}
	t.Fatalf("no top snapshot in:\n%s", out)
	return ""
}

// snapshotDiff runs `ctr snapshots diff KEY` (the diff of KEY against its parent, as a
// gzip tar read back from containerd's content store) and returns its stdout.
func snapshotDiff(t *testing.T, ctx context.Context, c *peers.Containerd, key string) []byte {
	t.Helper()
	cmd := exec.CommandContext(ctx, filepath.Join(peers.ToolsDir(), "ctr"), "--address", c.Address,
		"--namespace", peers.Namespace, "snapshots", "--snapshotter", "overlayfs", "diff", key)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		log, _ := os.ReadFile(c.LogPath)
		t.Fatalf("ctr snapshots diff %s: %v\n%s\ncontainerd log:\n%s", key, err, stderr.String(), tail(string(log), 30))
	}
	return stdout.Bytes()
}

// checkLayerTar asserts the gzip tar holds name with size bytes.
func checkLayerTar(t *testing.T, b []byte, name string, size int64) {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("diff is not gzip (%d bytes): %v", len(b), err)
	}
	tr := tar.NewReader(zr)
	var names []string
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if hdr.Name == name && hdr.Size == size {
			return
		}
		names = append(names, fmt.Sprintf("%s (%d)", hdr.Name, hdr.Size))
	}
	t.Fatalf("diff has no %s of %d bytes: %v", name, size, names)
}

// tail is the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
