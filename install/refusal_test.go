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
