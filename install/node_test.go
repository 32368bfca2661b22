package install

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// script is node.sh next to this file.
var script = func() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "node.sh")
}()

// run runs node.sh with args and returns its combined output and exit status. The peers'
// tool directory comes first on PATH, so the script checks its work with the real
// containerd v2.3.4, as it would with the node's own.
func run(t *testing.T, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, script, args...)
	cmd.Env = append(os.Environ(), "PATH="+peers.ToolsDir()+":"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("node.sh: %v\n%s", err, out)
	}
	return string(out), code
}

// mustRun runs node.sh and fails the test unless it exits 0.
func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	out, code := run(t, args...)
	if code != 0 {
		t.Fatalf("node.sh %s: exit status %d\n%s", strings.Join(args, " "), code, out)
	}
	return out
}

// snapshot describes every entry under root: type, permissions and, for files, a
// SHA-256 of the content. Two equal snapshots are byte-identical trees.
func snapshot(t *testing.T, root string) map[string]string {
	t.Helper()
	m := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			m[rel] = "link " + target
		case d.IsDir():
			m[rel] = fmt.Sprintf("dir %v", info.Mode())
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			m[rel] = fmt.Sprintf("file %v %s", info.Mode(), hex.EncodeToString(sum[:]))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func sameTree(t *testing.T, what string, want, got map[string]string) {
	t.Helper()
	var diffs []string
	for k, v := range want {
		if got[k] != v {
			diffs = append(diffs, fmt.Sprintf("  %s: was %q, now %q", k, v, got[k]))
		}
	}
	for k, v := range got {
		if _, ok := want[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("  %s: new, %q", k, v))
		}
	}
	if len(diffs) > 0 {
		slices.Sort(diffs)
		t.Fatalf("%s: the tree changed:\n%s", what, strings.Join(diffs, "\n"))
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// Sandbox paths: the script's defaults under the sandbox root.
func configPath(root string) string { return filepath.Join(root, "etc/containerd/config.toml") }
func dropinPath(root string) string {
	return filepath.Join(root, "etc/containerd/conf.d/cove-node.toml")
}
func hostsDir(root string) string  { return filepath.Join(root, "etc/containerd/certs.d") }
func hostsTOML(root string) string { return filepath.Join(hostsDir(root), "_default/hosts.toml") }
func unitPath(root string) string  { return filepath.Join(root, "etc/systemd/system/cove-node.service") }

// installArgs are the flags of an install into root, with cove-node built from this
// checkout.
func installArgs(t *testing.T, root, cache, addr string, extra ...string) []string {
	return append([]string{"--root-dir", root, "--no-restart",
		"--binary", peers.CoveBinary(t, "cove-node"), "--cache", cache, "--addr", addr}, extra...)
}

// execStart is the command line the installed unit runs.
func execStart(t *testing.T, root string) []string {
	t.Helper()
	unit := readFile(t, unitPath(root))
	for _, want := range []string{"\nBefore=containerd.service\n", "\nRestart=always\n", "\nWantedBy=multi-user.target\n"} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q:\n%s", strings.TrimSpace(want), unit)
		}
	}
	for _, line := range strings.Split(unit, "\n") {
		if cmd, ok := strings.CutPrefix(line, "ExecStart="); ok {
			argv := strings.Fields(cmd)
			if slices.Contains(argv, "--content-socket") {
				t.Errorf("ExecStart passes --content-socket without --content-hook: %s", cmd)
			}
			return argv
		}
	}
	t.Fatalf("no ExecStart in the unit:\n%s", unit)
	return nil
}

// verifyUnit has systemd itself check the unit (syntax, and that ExecStart's binary is
// executable) when systemd-analyze is installed.
func verifyUnit(t *testing.T, root string, more ...string) {
	t.Helper()
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Log("systemd-analyze not installed: unit not verified by systemd")
		return
	}
	if out, err := exec.Command(sa, append([]string{"verify", unitPath(root)}, more...)...).CombinedOutput(); err != nil {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

func blobs(img peers.Image) []string { return append([]string{img.Config}, img.Layers...) }

// The whole path for real: node.sh edits a realistic containerd config (version 3) in a
// sandbox; cove-node runs exactly as the installed unit says; containerd runs from the
// edited config. ctr (with --hosts-dir) and crictl (CRI reads config_path from the
// drop-in, which only imports can load) both pull through cove-node and cove-cache. Then
// a second run changes nothing and --uninstall restores the sandbox byte for byte.
func TestInstallPullsThroughCoveNode(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 2, 1<<20)
	cache := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)

	root := t.TempDir()
	layout := peers.NewContainerdLayout(t)
	writeFile(t, configPath(root), layout.BaseConfig(3))
	before := snapshot(t, root)

	addr := freeAddr(t)
	args := installArgs(t, root, cache.URL, addr, "--origin-plain-http", origin.Addr)
	out := mustRun(t, args...)
	t.Logf("first run:\n%s", out)
	installed := snapshot(t, root)
	out = mustRun(t, args...)
	sameTree(t, "second run", installed, snapshot(t, root))
	if !strings.Contains(out, "nothing to change") {
		t.Errorf("second run does not say it changed nothing:\n%s", out)
	}

	hosts := readFile(t, hostsTOML(root))
	for _, want := range []string{`[host."http://` + addr + `"]`, `capabilities = ["pull", "resolve"]`, `dial_timeout = "300ms"`} {
		if !strings.Contains(hosts, want) {
			t.Errorf("hosts.toml lacks %s:\n%s", want, hosts)
		}
	}
	if strings.Contains(hosts, "server") {
		t.Errorf("hosts.toml has a server line:\n%s", hosts)
	}
	dropin := readFile(t, dropinPath(root))
	if !strings.Contains(dropin, "version = 3\n") || !strings.Contains(dropin, `[plugins."io.containerd.cri.v1.images".registry]`) ||
		!strings.Contains(dropin, `config_path = "`+hostsDir(root)+`"`) {
		t.Errorf("drop-in:\n%s", dropin)
	}
	if cfg := readFile(t, configPath(root)); !strings.Contains(cfg, `imports = ["`+dropinPath(root)+`"]`) {
		t.Errorf("root config does not import the drop-in:\n%s", cfg)
	}
	verifyUnit(t, root)

	argv := execStart(t, root)
	if argv[0] != filepath.Join(root, "usr/local/bin/cove-node") || !slices.Contains(argv, filepath.Join(root, "var/lib/cove-node")) {
		t.Errorf("ExecStart paths are not under the root dir: %q", argv)
	}
	node := peers.StartCoveNodeCommand(t, argv)
	if node.Addr != addr {
		t.Fatalf("cove-node listens on %s, want %s", node.Addr, addr)
	}
	ctd := peers.StartContainerdWithConfig(t, configPath(root), layout, hostsDir(root))

	// ctr: the transfer service, reading hosts.toml only through --hosts-dir.
	if err := ctd.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, ctd, img)
	afterCtr := node.Metric(t, "cove_node_requests_total", `served_by="cache"`)
	if afterCtr == 0 {
		t.Fatalf("ctr pull did not go through cove-node to the cache")
	}

	// crictl: CRI, reading config_path from the drop-in. Remove the image and its
	// content first so every blob is fetched again.
	crictlPullAfresh(t, ctx, ctd, img)
	afterCRI := node.Metric(t, "cove_node_requests_total", `served_by="cache"`)
	if afterCRI <= afterCtr {
		t.Fatalf("crictl pull did not go through cove-node (cache-served requests %v before, %v after): CRI does not read the drop-in's config_path\n%s",
			afterCtr, afterCRI, ctd.Log())
	}
	if n := node.Metric(t, "cove_node_requests_total", `served_by="origin"`); n != 0 {
		t.Errorf("%v requests fell back to the origin with a healthy cache", n)
	}
	gets := origin.BlobGETs()
	for _, d := range blobs(img) {
		if gets[d] != 1 {
			t.Errorf("origin GETs of %s = %d across both pulls, want 1 (cove-cache fetches once)", d, gets[d])
		}
	}
	t.Logf("cove-node requests served by the cache: %v after ctr, %v after crictl", afterCtr, afterCRI)

	ctd.Stop()
	node.Stop()
	out = mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
	t.Logf("uninstall:\n%s", out)
	sameTree(t, "uninstall", before, snapshot(t, root))
}

// crictlPullAfresh removes img and its content from ctd, then pulls it again with crictl
// (CRI, which reads the registry config_path of the installed drop-in) and checks it.
func crictlPullAfresh(t *testing.T, ctx context.Context, ctd *peers.Containerd, img peers.Image) {
	t.Helper()
	if err := ctd.RemoveImage(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	left, err := ctd.ContentDigests(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range img.Layers {
		if slices.Contains(left, d) {
			t.Fatalf("layer %s still in the content store after ctr images rm --sync", d)
		}
	}
	if err := ctd.CrictlPull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, ctd, img)
}

// A version-2 root config (containerd 1.7's layout, still read by 2.x) gets a version-2
// drop-in naming the old CRI plugin; containerd v2.3.4 starts from it, migrates it, and
// CRI pulls through cove-node.
func TestInstallVersion2Config(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/old:v2", 1, 512<<10)
	cache := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)

	root := t.TempDir()
	layout := peers.NewContainerdLayout(t)
	writeFile(t, configPath(root), layout.BaseConfig(2))
	before := snapshot(t, root)
	mustRun(t, installArgs(t, root, cache.URL, freeAddr(t), "--origin-plain-http", origin.Addr)...)

	dropin := readFile(t, dropinPath(root))
	if !strings.Contains(dropin, "version = 2\n") || !strings.Contains(dropin, `[plugins."io.containerd.grpc.v1.cri".registry]`) {
		t.Fatalf("drop-in for a version-2 root config:\n%s", dropin)
	}
	node := peers.StartCoveNodeCommand(t, execStart(t, root))
	ctd := peers.StartContainerdWithConfig(t, configPath(root), layout, hostsDir(root))
	if err := ctd.CrictlPull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, ctd, img)
	if n := node.Metric(t, "cove_node_requests_total", `served_by="cache"`); n == 0 {
		t.Fatalf("crictl pull did not go through cove-node: CRI did not get config_path from the version-2 drop-in\n%s", ctd.Log())
	}
	for _, d := range blobs(img) {
		if n := origin.BlobGETs()[d]; n != 1 {
			t.Errorf("origin GETs of %s = %d, want 1", d, n)
		}
	}
	ctd.Stop()
	node.Stop()
	mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
	sameTree(t, "uninstall", before, snapshot(t, root))
}
