package install

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
)

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
