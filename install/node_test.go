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
	"github.com/cove-oci/cove/internal/testpki"
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

// Install, install again (nothing changes), uninstall (everything as before) over
// several starting points. containerd checks every install (config dump).
func TestUninstallRestores(t *testing.T) {
	t.Parallel()
	defaultConfig, err := exec.Command(filepath.Join(peers.ToolsDir(), "containerd"), "config", "default").Output()
	if err != nil {
		t.Fatalf("containerd config default: %v", err)
	}
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, root string)
		check func(t *testing.T, root, addr string)
	}{{
		name: "no prior config",
		check: func(t *testing.T, root, _ string) {
			cfg := readFile(t, configPath(root))
			if !strings.Contains(cfg, "version = 3\nimports = [\""+dropinPath(root)+"\"]\n") {
				t.Errorf("created root config:\n%s", cfg)
			}
		},
	}, {
		name: "root config with settings and its own imports",
		setup: func(t *testing.T, root string) {
			writeFile(t, filepath.Join(root, "etc/containerd/runtime.toml"),
				"version = 3\n[plugins.\"io.containerd.cri.v1.runtime\"]\n  enable_selinux = false\n")
			writeFile(t, configPath(root), `# Managed by hand.
version = 3
root = "/var/lib/containerd"
oom_score = -999
imports = [
  "runtime.toml", # relative to this file
  "`+root+`/etc/containerd/extra/*.toml"
]

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".registry.headers]
    X-Team = ["infra"]

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
`)
		},
		check: func(t *testing.T, root, _ string) {
			cfg := readFile(t, configPath(root))
			want := "  \"" + root + "/etc/containerd/extra/*.toml\",\n  \"" + dropinPath(root) + "\",\n]\n"
			if !strings.Contains(cfg, want) || !strings.Contains(cfg, "oom_score = -999\n") {
				t.Errorf("root config:\n%s", cfg)
			}
		},
	}, {
		name: "one-line imports",
		setup: func(t *testing.T, root string) {
			writeFile(t, filepath.Join(root, "etc/containerd/a.toml"), "version = 3\n")
			writeFile(t, configPath(root), "version = 3\nimports = [\"a.toml\"] # one\n")
		},
		check: func(t *testing.T, root, _ string) {
			if cfg := readFile(t, configPath(root)); cfg != "version = 3\nimports = [\"a.toml\", \""+dropinPath(root)+"\"] # one\n" {
				t.Errorf("root config:\n%s", cfg)
			}
		},
	}, {
		name: "imports glob already loads the drop-in",
		setup: func(t *testing.T, root string) {
			writeFile(t, configPath(root), "version = 3\nimports = [\""+root+"/etc/containerd/conf.d/*.toml\"]\n")
		},
		check: func(t *testing.T, root, _ string) {
			if cfg := readFile(t, configPath(root)); cfg != "version = 3\nimports = [\""+root+"/etc/containerd/conf.d/*.toml\"]\n" {
				t.Errorf("root config changed although its glob import loads the drop-in:\n%s", cfg)
			}
		},
	}, {
		name: "config_path already the hosts dir",
		setup: func(t *testing.T, root string) {
			writeFile(t, configPath(root), "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \""+hostsDir(root)+"\"\n")
		},
	}, {
		name: "containerd config default at version 4",
		setup: func(t *testing.T, root string) {
			writeFile(t, configPath(root), string(defaultConfig))
		},
		check: func(t *testing.T, root, _ string) {
			if d := readFile(t, dropinPath(root)); !strings.Contains(d, "version = 3\n") {
				t.Errorf("drop-in for a version 4 root:\n%s", d)
			}
		},
	}, {
		name: "hosts.toml with another mirror",
		setup: func(t *testing.T, root string) {
			writeFile(t, configPath(root), "version = 3\n")
			writeFile(t, hostsTOML(root), `# The team's mirror.
[host."https://mirror.example.com"]
  capabilities = ["pull", "resolve"]
  [host."https://mirror.example.com".header]
    X-Mirror = ["1"]
`)
		},
		check: func(t *testing.T, root, addr string) {
			h := readFile(t, hostsTOML(root))
			cove := strings.Index(h, `[host."http://`+addr+`"]`)
			other := strings.Index(h, `# The team's mirror.`)
			if cove < 0 || other < 0 || cove > other || !strings.Contains(h, `[host."https://mirror.example.com".header]`) {
				t.Errorf("hosts.toml: want cove's mirror first, then the other one with its comment:\n%s", h)
			}
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			if tc.setup != nil {
				tc.setup(t, root)
			}
			before := snapshot(t, root)
			addr := freeAddr(t)
			args := installArgs(t, root, "http://127.0.0.1:5005", addr)
			out := mustRun(t, args...)
			if !strings.Contains(out, "checked: containerd") {
				t.Errorf("containerd did not check the result:\n%s", out)
			}
			if tc.check != nil {
				tc.check(t, root, addr)
			}
			installed := snapshot(t, root)
			mustRun(t, args...)
			sameTree(t, "second run", installed, snapshot(t, root))
			mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
			sameTree(t, "uninstall", before, snapshot(t, root))
			// Uninstalling again is a no-op.
			mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
			sameTree(t, "second uninstall", before, snapshot(t, root))
		})
	}
}

// Changing the flags updates the install in place; --uninstall still restores the
// original node, not the first install.
func TestReinstallWithOtherFlags(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	writeFile(t, hostsTOML(root), "[host.\"https://mirror.example.com\"]\n")
	writeFile(t, configPath(root), "version = 3\n")
	before := snapshot(t, root)
	mustRun(t, installArgs(t, root, "http://127.0.0.1:5005", "127.0.0.1:5006")...)
	mustRun(t, installArgs(t, root, "http://127.0.0.1:5007", "127.0.0.1:5008", "--origin-plain-http", "127.0.0.1:5000")...)
	h := readFile(t, hostsTOML(root))
	if strings.Contains(h, "5006") || strings.Count(h, "[host.") != 2 || strings.Index(h, "5008") > strings.Index(h, "mirror.example.com") {
		t.Errorf("hosts.toml after a new --addr:\n%s", h)
	}
	if argv := execStart(t, root); !slices.Contains(argv, "http://127.0.0.1:5007") || slices.Contains(argv, "http://127.0.0.1:5005") {
		t.Errorf("ExecStart after a new --cache: %q", argv)
	}
	mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
	sameTree(t, "uninstall", before, snapshot(t, root))
}

// A file edited after the install keeps those edits at --uninstall; only what the
// install added goes.
func TestUninstallKeepsLaterEdits(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	orig := "version = 3\nimports = [\n  \"a.toml\"\n]\n"
	writeFile(t, filepath.Join(root, "etc/containerd/a.toml"), "version = 3\n")
	writeFile(t, configPath(root), orig)
	mustRun(t, installArgs(t, root, "http://127.0.0.1:5005", "127.0.0.1:5006")...)

	cfg := readFile(t, configPath(root))
	writeFile(t, configPath(root), cfg+"oom_score = 1\n")
	hosts := readFile(t, hostsTOML(root))
	writeFile(t, hostsTOML(root), hosts+"\n[host.\"https://later.example.com\"]\n")

	out := mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
	if got, want := readFile(t, configPath(root)), "version = 3\nimports = [\n  \"a.toml\",\n]\noom_score = 1\n"; got != want {
		t.Errorf("root config after uninstall:\n%s\nwant:\n%s\n%s", got, want, out)
	}
	if got, want := readFile(t, hostsTOML(root)), "\n[host.\"https://later.example.com\"]\n"; got != want {
		t.Errorf("hosts.toml after uninstall: %q, want %q", got, want)
	}
	if _, err := os.Stat(dropinPath(root)); !os.IsNotExist(err) {
		t.Errorf("drop-in still there after uninstall: %v", err)
	}
	if _, err := os.Stat(filepath.Join(root, "var/lib/cove-node")); !os.IsNotExist(err) {
		t.Errorf("state directory still there after uninstall: %v", err)
	}
}

// Bad input: a non-zero exit status, a message, and the sandbox exactly as it was.
func TestBadInputChangesNothing(t *testing.T) {
	t.Parallel()
	good := func(t *testing.T, root string) []string {
		return installArgs(t, root, "http://127.0.0.1:5005", "127.0.0.1:5006")
	}
	without := func(args []string, flag string) []string { // flag and its value
		i := slices.Index(args, flag)
		if flag == "--no-restart" {
			return slices.Delete(slices.Clone(args), i, i+1)
		}
		return slices.Delete(slices.Clone(args), i, i+2)
	}
	with := func(args []string, flag, value string) []string {
		out := slices.Clone(args)
		out[slices.Index(out, flag)+1] = value
		return out
	}
	notCoveNode, _ := exec.LookPath("true")
	for _, tc := range []struct {
		name   string
		config string // root config; empty: a realistic version 3 config
		hosts  string // _default/hosts.toml, if any
		args   func(t *testing.T, root string) []string
		want   string // in the output
	}{
		{name: "unknown flag", args: func(t *testing.T, r string) []string { return append(good(t, r), "--frobnicate") }, want: "unknown argument"},
		{name: "missing --cache", args: func(t *testing.T, r string) []string { return without(good(t, r), "--cache") }, want: "--cache URL is required"},
		{name: "--cache ftp", args: func(t *testing.T, r string) []string { return with(good(t, r), "--cache", "ftp://cache:5005") }, want: "--cache"},
		{name: "--cache with path", args: func(t *testing.T, r string) []string { return with(good(t, r), "--cache", "http://cache:5005/v2/") }, want: "--cache"},
		{name: "--cache without host", args: func(t *testing.T, r string) []string { return with(good(t, r), "--cache", "http://") }, want: "--cache"},
		{name: "--cache with user", args: func(t *testing.T, r string) []string { return with(good(t, r), "--cache", "http://u:p@cache:5005") }, want: "--cache"},
		{name: "--addr not loopback", args: func(t *testing.T, r string) []string { return with(good(t, r), "--addr", "0.0.0.0:5006") }, want: "loopback"},
		{name: "--addr remote", args: func(t *testing.T, r string) []string { return with(good(t, r), "--addr", "10.0.0.1:5006") }, want: "loopback"},
		{name: "--addr without port", args: func(t *testing.T, r string) []string { return with(good(t, r), "--addr", "127.0.0.1") }, want: "--addr"},
		{name: "--addr port out of range", args: func(t *testing.T, r string) []string { return with(good(t, r), "--addr", "127.0.0.1:70000") }, want: "port"},
		{name: "missing binary", args: func(t *testing.T, r string) []string { return with(good(t, r), "--binary", r+"/nope/cove-node") }, want: "--binary"},
		{name: "binary not cove-node", args: func(t *testing.T, r string) []string { return with(good(t, r), "--binary", notCoveNode) }, want: "not cove-node"},
		{name: "--root-dir without --no-restart", args: func(t *testing.T, r string) []string { return without(good(t, r), "--no-restart") }, want: "--no-restart"},
		{name: "uninstall with install flags", args: func(t *testing.T, r string) []string { return append(good(t, r), "--uninstall") }, want: "uninstall takes only"},
		{name: "unparsable root config", config: "version = 3\n[plugins.\"io.containerd.cri.v1.images\"\n", args: good, want: "not valid TOML"},
		{name: "duplicate key in root config", config: "version = 3\nroot = \"/a\"\nroot = \"/b\"\n", args: good, want: "already defined"},
		{name: "root config version 1", config: "root = \"/var/lib/containerd\"\n", args: good, want: "no version"},
		{
			name:   "config_path set elsewhere",
			config: "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/docker/certs.d\"\n",
			args:   good, want: "already sets CRI's registry config_path",
		},
		{
			name:   "config_path set in an old-style section",
			config: "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n",
			args:   good, want: "already sets CRI's registry config_path",
		},
		{
			name:   "deprecated registry.mirrors",
			config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://mirror.gcr.io\"]\n",
			args:   good, want: "registry.mirrors",
		},
		{name: "unparsable hosts.toml", hosts: "[host.\"http://x\"\n", args: good, want: "not valid TOML"},
		{name: "hosts.toml already lists the address", hosts: "[host.\"http://127.0.0.1:5006\"]\n", args: good, want: "already lists"},
		{
			name:   "content hook on a version 2 config",
			config: "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n",
			args:   func(t *testing.T, r string) []string { return append(good(t, r), "--content-hook") }, want: "version = 2",
		},
		{
			name: "uninstall with --content-hook",
			args: func(t *testing.T, r string) []string {
				return []string{"--root-dir", r, "--no-restart", "--uninstall", "--content-hook", "--binary", peers.CoveBinary(t, "cove-node")}
			},
			want: "uninstall takes only",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			config := tc.config
			if config == "" {
				config = peers.NewContainerdLayout(t).BaseConfig(3)
			}
			writeFile(t, configPath(root), config)
			if tc.hosts != "" {
				writeFile(t, hostsTOML(root), tc.hosts)
			}
			before := snapshot(t, root)
			out, code := run(t, tc.args(t, root)...)
			if code == 0 {
				t.Fatalf("exit status 0, want non-zero:\n%s", out)
			}
			if !strings.Contains(out, tc.want) {
				t.Errorf("output does not mention %q:\n%s", tc.want, out)
			}
			sameTree(t, tc.name, before, snapshot(t, root))
		})
	}
}

// A failure after the first change rolls every change of the run back: here the drop-in's
// directory conf.d is a file, found only when the install writes the drop-in, after it
// has installed the binary, the unit and hosts.toml (and made their directories).
func TestFailureMidwayRollsBack(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	writeFile(t, configPath(root), "version = 3\n")
	writeFile(t, filepath.Join(root, "etc/containerd/conf.d"), "not a directory\n")
	before := snapshot(t, root)
	out, code := run(t, installArgs(t, root, "http://127.0.0.1:5005", "127.0.0.1:5006")...)
	if code == 0 || !strings.Contains(out, "rolled back") {
		t.Fatalf("exit status %d, want a failure and a rollback:\n%s", code, out)
	}
	for _, want := range []string{"created: /usr/local/bin/cove-node", "created: /etc/containerd/certs.d/_default/hosts.toml"} {
		if !strings.Contains(out, want) {
			t.Errorf("the install failed before it changed anything (no %q): not a midway failure\n%s", want, out)
		}
	}
	sameTree(t, "rollback", before, snapshot(t, root))
}

// A hosts directory whose _default is a file is found before anything changes.
func TestHostsDefaultNotADirectory(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	writeFile(t, configPath(root), "version = 3\n")
	writeFile(t, filepath.Join(hostsDir(root), "_default"), "not a directory\n")
	before := snapshot(t, root)
	out, code := run(t, installArgs(t, root, "http://127.0.0.1:5005", "127.0.0.1:5006")...)
	if code != 1 || !strings.Contains(out, "not a directory") || !strings.Contains(out, "nothing was changed") {
		t.Fatalf("exit status %d, want 1 and a refusal that changed nothing:\n%s", code, out)
	}
	sameTree(t, "refusal", before, snapshot(t, root))
}

// Per-registry directories hide _default: the script says so, and still installs.
func TestWarnsAboutHidingDirectories(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	writeFile(t, configPath(root), "version = 3\n")
	writeFile(t, filepath.Join(hostsDir(root), "ghcr.io", "ca.crt"), "cert\n")
	writeFile(t, filepath.Join(hostsDir(root), "ghcr.io", "hosts.toml"), "server = \"https://ghcr.io\"\n[host.\"https://ghcr-mirror.example.com\"]\n")
	before := snapshot(t, hostsDir(root))
	out := mustRun(t, installArgs(t, root, "http://127.0.0.1:5005", "127.0.0.1:5006")...)
	if !strings.Contains(out, "ghcr.io/ exists") || !strings.Contains(out, "bypass cove-node") {
		t.Errorf("no warning about certs.d/ghcr.io:\n%s", out)
	}
	// Another registry's directory, and the mirrors configured in it, stay as they were.
	after := snapshot(t, hostsDir(root))
	for _, p := range []string{"ghcr.io", "ghcr.io/ca.crt", "ghcr.io/hosts.toml"} {
		if before[p] != after[p] {
			t.Errorf("%s changed: %q, was %q", p, after[p], before[p])
		}
	}
}

// containerd 1.x is refused before anything changes, with the reason. No containerd 1.x
// binary is at hand: a script answers --version as containerd 1.7.22 does, and the
// refusal reads nothing else from it.
func TestRefusesContainerd1(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	writeFile(t, configPath(root), "version = 2\n")
	fake := filepath.Join(t.TempDir(), "containerd")
	writeFile(t, fake, "#!/bin/sh\necho 'containerd github.com/containerd/containerd v1.7.22 7f7fdf5fed64eb6a7caf99b3e12efcf9d60e311c'\n")
	if err := os.Chmod(fake, 0o755); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, root)
	out, code := run(t, installArgs(t, root, "http://127.0.0.1:5005", "127.0.0.1:5006", "--containerd-bin", fake)...)
	if code != 1 || !strings.Contains(out, "containerd 1.7 is not supported") || !strings.Contains(out, "nothing was changed") {
		t.Fatalf("exit status %d, want 1, the refusal of containerd 1.7 and nothing changed:\n%s", code, out)
	}
	sameTree(t, "refusal", before, snapshot(t, root))
}

func socketUnitPath(root string) string {
	return filepath.Join(root, "etc/systemd/system/cove-node.socket")
}

// unitValue is the value of key in the systemd unit text (the last one wins).
func unitValues(unit, key string) []string {
	var vals []string
	for _, line := range strings.Split(unit, "\n") {
		if v, ok := strings.CutPrefix(line, key+"="); ok {
			vals = append(vals, v)
		}
	}
	return vals
}

// flagValue is the value of --name in argv.
func flagValue(argv []string, name string) string {
	if i := slices.Index(argv, name); i >= 0 && i+1 < len(argv) {
		return argv[i+1]
	}
	return ""
}

// The content-hook mode for real: node.sh installs into a sandbox with --content-hook;
// the test plays systemd (it listens on the socket unit's ListenStream and starts the
// unit's ExecStart with that socket as fd 3, LISTEN_FDS=1, LISTEN_PID); containerd runs
// from the edited config with cove-node as its content store and differ. ctr and crictl
// pull through cove-node and cove-cache, the blobs land in the content root cove-node
// serves, and containerd asks the resolver hook for manifests only (prefill). Then a
// second run changes nothing and --uninstall restores the sandbox byte for byte.
func TestInstallContentHook(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/hook:v1", 2, 1<<20)
	cache := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)

	root := shortDir(t) // the content socket lives under it: unix socket paths are short
	layout := peers.NewContainerdLayout(t)
	writeFile(t, configPath(root), layout.BaseConfig(3))
	before := snapshot(t, root)

	addr := freeAddr(t)
	args := installArgs(t, root, cache.URL, addr, "--origin-plain-http", origin.Addr, "--content-hook")
	out := mustRun(t, args...)
	t.Logf("first run:\n%s", out)
	if !strings.Contains(out, "content hook on") {
		t.Errorf("containerd did not check the content hook's configuration:\n%s", out)
	}
	installed := snapshot(t, root)
	out = mustRun(t, args...)
	sameTree(t, "second run", installed, snapshot(t, root))
	if !strings.Contains(out, "nothing to change") {
		t.Errorf("second run does not say it changed nothing:\n%s", out)
	}

	// The socket unit, and the service bound to it.
	sockUnit := readFile(t, socketUnitPath(root))
	listen := unitValues(sockUnit, "ListenStream")
	sock := filepath.Join(root, "run/cove-node/content.sock")
	if len(listen) != 1 || listen[0] != sock {
		t.Fatalf("socket unit ListenStream = %q, want %s:\n%s", listen, sock, sockUnit)
	}
	for _, want := range []string{"\nSocketMode=0660\n", "\nBefore=containerd.service\n", "\nWantedBy=sockets.target\n"} {
		if !strings.Contains(sockUnit, want) {
			t.Errorf("socket unit lacks %q:\n%s", strings.TrimSpace(want), sockUnit)
		}
	}
	unit := readFile(t, unitPath(root))
	for _, want := range []string{"\nRequires=cove-node.socket\n", "\nAfter=cove-node.socket\n", "\nRestartSec=0\n"} {
		if !strings.Contains(unit, want) {
			t.Errorf("unit lacks %q:\n%s", strings.TrimSpace(want), unit)
		}
	}
	argv := strings.Fields(unitValues(unit, "ExecStart")[0])
	contentRoot := filepath.Join(layout.Root, "io.containerd.content.v1.content")
	for flag, want := range map[string]string{
		"--content-socket": sock, "--content-root": contentRoot, "--containerd-address": layout.Address,
		"--root": filepath.Join(root, "var/lib/cove-node"), "--addr": addr,
	} {
		if got := flagValue(argv, flag); got != want {
			t.Errorf("ExecStart %s = %q, want %q: %q", flag, got, want, argv)
		}
	}
	dropin := readFile(t, dropinPath(root))
	for _, want := range []string{
		"version = 3\n", `disabled_plugins = ["io.containerd.content.v1.content"]`, `address = "` + sock + `"`,
		`[plugins."io.containerd.cri.v1.images".registry]`, `config_path = "` + hostsDir(root) + `"`,
	} {
		if !strings.Contains(dropin, want) {
			t.Errorf("drop-in lacks %s:\n%s", want, dropin)
		}
	}
	if strings.Count(dropin, "version = ") != 1 {
		t.Errorf("drop-in has more than one version line:\n%s", dropin)
	}
	verifyUnit(t, root, socketUnitPath(root))

	// Play systemd: the socket first, then the service with it as fd 3.
	node := peers.StartCoveNodeActivated(t, argv, sock)
	ctd := peers.StartContainerdWithConfig(t, configPath(root), layout, hostsDir(root))
	if log := readFile(t, node.LogPath); !strings.Contains(log, `"socket_activated":true`) {
		t.Errorf("cove-node did not take the socket from fd 3:\n%s", log)
	}

	// ctr: transfer service, hosts.toml through --hosts-dir, unpack through cove-diff.
	if err := ctd.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, ctd, img)
	checkContentRoot(t, contentRoot, img)
	afterCtr := node.Metric(t, "cove_node_requests_total")
	if afterCtr == 0 {
		t.Fatalf("ctr pull did not go through cove-node")
	}
	// containerd asked the mirror for the manifest only (HEAD by tag, GET by digest):
	// cove-node prefilled every blob into the store it serves containerd.
	if afterCtr > 2 {
		t.Errorf("containerd sent %v requests to the resolver hook; want at most 2 (the manifest): the content hook was not used", afterCtr)
	}

	// crictl: CRI, config_path from the same drop-in.
	crictlPullAfresh(t, ctx, ctd, img)
	checkContentRoot(t, contentRoot, img)
	afterCRI := node.Metric(t, "cove_node_requests_total")
	if afterCRI <= afterCtr || afterCRI-afterCtr > 2 {
		t.Errorf("crictl pull: %v requests to the resolver hook, want 1 or 2 (the manifest)\n%s", afterCRI-afterCtr, ctd.Log())
	}
	if n := node.Metric(t, "cove_node_requests_total", `served_by="origin"`); n != 0 {
		t.Errorf("%v requests fell back to the origin with a healthy cache", n)
	}
	for _, d := range blobs(img) {
		if n := origin.BlobGETs()[d]; n != 1 {
			t.Errorf("origin GETs of %s = %d across both pulls, want 1 (cove-cache fetches once)", d, n)
		}
	}
	t.Logf("cove-node requests: %v after ctr, %v after crictl", afterCtr, afterCRI)

	ctd.Stop()
	node.Stop()
	// systemd's part: the socket goes with the socket unit (RemoveOnStop), and /run is
	// a tmpfs.
	if err := os.RemoveAll(filepath.Join(root, "run")); err != nil {
		t.Fatal(err)
	}
	out = mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
	t.Logf("uninstall:\n%s", out)
	if _, err := os.Stat(socketUnitPath(root)); !os.IsNotExist(err) {
		t.Errorf("socket unit still there after uninstall: %v", err)
	}
	sameTree(t, "uninstall", before, snapshot(t, root))
}

// checkContentRoot: every blob of img is a file in the content root cove-node serves.
func checkContentRoot(t *testing.T, contentRoot string, img peers.Image) {
	t.Helper()
	for _, d := range append(blobs(img), img.Digest) {
		algo, hexd, _ := strings.Cut(d, ":")
		if _, err := os.Stat(filepath.Join(contentRoot, "blobs", algo, hexd)); err != nil {
			t.Errorf("blob %s not in cove-node's content root: %v", d, err)
		}
	}
}

// shortDir is a directory under /tmp with a short name, removed at cleanup.
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("/tmp", "cvi-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// Switching the content hook off (an install without --content-hook over one with it)
// takes the socket unit and the proxy plugins away; --uninstall still restores the node
// as it was before the first install.
func TestContentHookOffAndOn(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	writeFile(t, configPath(root), "version = 3\n")
	before := snapshot(t, root)
	mirror := installArgs(t, root, "http://127.0.0.1:5005", "127.0.0.1:5006")
	hook := append(slices.Clone(mirror), "--content-hook")
	mustRun(t, hook...)
	if _, err := os.Stat(socketUnitPath(root)); err != nil {
		t.Fatalf("no socket unit: %v", err)
	}
	withHook := snapshot(t, root)
	out := mustRun(t, mirror...)
	if _, err := os.Stat(socketUnitPath(root)); !os.IsNotExist(err) {
		t.Errorf("socket unit still there with the content hook off: %v\n%s", err, out)
	}
	if d := readFile(t, dropinPath(root)); strings.Contains(d, "proxy_plugins") || strings.Contains(d, "disabled_plugins") {
		t.Errorf("drop-in with the content hook off:\n%s", d)
	}
	if argv := execStart(t, root); slices.Contains(argv, "--content-socket") {
		t.Errorf("ExecStart with the content hook off: %q", argv)
	}
	mustRun(t, hook...)
	sameTree(t, "content hook on again", withHook, snapshot(t, root))
	mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
	sameTree(t, "uninstall", before, snapshot(t, root))
}

func cacheCAPath(root string) string { return filepath.Join(root, "etc/cove-node/cache-ca.pem") }

// testCABundle writes a PEM bundle of n self-signed CA certificates to a new file.
func testCABundle(t *testing.T, n int) (string, []byte) {
	t.Helper()
	var bundle []byte
	for i := range n {
		bundle = append(bundle, testpki.NewCA(t, fmt.Sprintf("cove test CA %d", i)).PEM...)
	}
	p := filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, p, string(bundle))
	return p, bundle
}

// --cache-ca: the bundle is installed under the root, ExecStart passes it to cove-node, a
// second run changes nothing, a run without --cache-ca takes it out again, and
// --uninstall restores the sandbox byte for byte, a bundle that was there before included.
func TestInstallCacheCA(t *testing.T) {
	t.Parallel()
	for _, prior := range []bool{false, true} {
		t.Run(fmt.Sprintf("prior file %v", prior), func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			writeFile(t, configPath(root), peers.NewContainerdLayout(t).BaseConfig(3))
			if prior {
				writeFile(t, cacheCAPath(root), "someone else's bundle\n")
			}
			before := snapshot(t, root)
			ca, bundle := testCABundle(t, 2)
			args := installArgs(t, root, "https://cove-cache.example:5005", "127.0.0.1:5006", "--cache-ca", ca)

			out := mustRun(t, args...)
			if got := flagValue(execStart(t, root), "--cache-ca"); got != cacheCAPath(root) {
				t.Errorf("ExecStart --cache-ca = %q, want %q\n%s", got, cacheCAPath(root), out)
			}
			if got := readFile(t, cacheCAPath(root)); got != string(bundle) {
				t.Errorf("installed bundle differs from --cache-ca's file:\n%s", got)
			}
			if st, err := os.Stat(cacheCAPath(root)); err != nil || (!prior && st.Mode().Perm() != 0o644) {
				t.Errorf("installed bundle: %v, %v", st, err)
			}
			if prior && !strings.Contains(out, "backed up /etc/cove-node/cache-ca.pem") {
				t.Errorf("the bundle there before was not backed up:\n%s", out)
			}
			verifyUnit(t, root)

			installed := snapshot(t, root)
			if out := mustRun(t, args...); !strings.Contains(out, "nothing to change") {
				t.Errorf("second run:\n%s", out)
			}
			sameTree(t, "second run", installed, snapshot(t, root))

			// Without --cache-ca the bundle goes as --uninstall would take it.
			mustRun(t, installArgs(t, root, "https://cove-cache.example:5005", "127.0.0.1:5006")...)
			if argv := execStart(t, root); slices.Contains(argv, "--cache-ca") {
				t.Errorf("ExecStart still passes --cache-ca: %q", argv)
			}
			if _, err := os.Stat(cacheCAPath(root)); prior == os.IsNotExist(err) {
				t.Errorf("bundle after a run without --cache-ca: %v", err)
			}
			if prior {
				if got := readFile(t, cacheCAPath(root)); got != "someone else's bundle\n" {
					t.Errorf("prior bundle not restored: %q", got)
				}
			}
			mustRun(t, args...)
			sameTree(t, "install again", installed, snapshot(t, root))

			mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
			sameTree(t, "uninstall", before, snapshot(t, root))
		})
	}
}

// A --cache-ca file that is not a PEM certificate bundle is refused, with the sandbox
// exactly as it was, on a fresh node and over an install made with a good bundle.
func TestCacheCARefusesNonPEM(t *testing.T) {
	t.Parallel()
	good, goodBundle := testCABundle(t, 1)
	body := strings.SplitN(string(goodBundle), "\n", 3)[1] // the first base64 line
	for _, tc := range []struct{ name, content, want string }{
		{"not PEM", "this is not a certificate\n", "not a PEM certificate bundle"},
		{"empty", "", "not a PEM certificate bundle"},
		{"DER", "0\x82\x01\x0a\x02\x82\x01\x01\x00", "not a PEM certificate bundle"},
		{"no END", "-----BEGIN CERTIFICATE-----\n" + body + "\n", "not a PEM certificate bundle"},
		{"not base64", "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n", "not a PEM certificate bundle"},
		{"not a certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid X.509 certificate"},
		{"a key only", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "private key"},
		{"a certificate and its key", string(goodBundle) + "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n", "private key"},
		{"missing file", "", "--cache-ca"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			bad := filepath.Join(t.TempDir(), "ca.pem")
			if tc.name != "missing file" {
				writeFile(t, bad, tc.content)
			}
			if tc.want == "not a valid X.509 certificate" {
				if _, err := exec.LookPath("openssl"); err != nil {
					t.Skip("openssl not installed: the script checks the PEM structure only")
				}
			}
			for _, installedFirst := range []bool{false, true} {
				root := t.TempDir()
				writeFile(t, configPath(root), "version = 3\n")
				if installedFirst {
					mustRun(t, installArgs(t, root, "https://cove-cache.example:5005", "127.0.0.1:5006", "--cache-ca", good)...)
				}
				before := snapshot(t, root)
				out, code := run(t, installArgs(t, root, "https://cove-cache.example:5005", "127.0.0.1:5006", "--cache-ca", bad)...)
				if code == 0 {
					t.Fatalf("exit status 0, want non-zero:\n%s", out)
				}
				if !strings.Contains(out, tc.want) || !strings.Contains(out, "othing was changed") {
					t.Errorf("output does not say %q and that nothing was changed:\n%s", tc.want, out)
				}
				sameTree(t, tc.name, before, snapshot(t, root))
			}
		})
	}
}
