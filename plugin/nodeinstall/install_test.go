package nodeinstall

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
)

// sandboxOptions are the options of an install into a fresh sandbox root, checked by the
// real containerd of the peers' tool directory. The binary installed is any executable
// file: Install only copies it.
func sandboxOptions(t *testing.T, root string) *Options {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "cove-node")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\necho cove-node test\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	o := &Options{
		Roots: Roots{RootDir: root}, NoRestart: true, Binary: bin, Caches: []string{"http://127.0.0.1:5005"},
		ContainerdBin: peers.Bin(t, "containerd"), Arch: "amd64",
	}
	var out bytes.Buffer
	o.Out, o.Err = &out, &out
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	return o
}

func write(t *testing.T, p, s string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

// tree is every file under root with its content.
func tree(t *testing.T, root string) map[string]string {
	t.Helper()
	m := map[string]string{}
	filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if d.IsDir() {
			m[rel+"/"] = ""
			return nil
		}
		b, _ := os.ReadFile(p)
		m[rel] = string(b)
		return nil
	})
	return m
}

// The root config, and everything it imports, is read with containerd's decoder, so
// settings the drop-in would fight are found however they are written.
func TestInstallRefusesConflictingRegistrySettings(t *testing.T) {
	for _, tc := range []struct{ name, config, imported, want string }{
		{"config_path in an inline table", "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\n  registry = { config_path = \"/etc/docker/certs.d\" }\n", "", "already sets CRI's registry config_path"},
		{"config_path by a dotted key at the top", "version = 3\nplugins.\"io.containerd.grpc.v1.cri\".registry.config_path = \"/x\"\n", "", "already sets CRI's registry config_path"},
		{"config_path in an imported file", "version = 3\nimports = [\"more.toml\"]\n", "version = 3\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/x:/y\"\n", "more.toml already sets"},
		{"mirrors in an inline table", "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  mirrors = { \"docker.io\" = { endpoint = [\"https://m\"] } }\n", "", "registry.mirrors"},
		{"an import that does not exist", "version = 3\nimports = [\"missing.toml\"]\n", "", "missing.toml"},
		{"version 1", "[plugins.cri]\n  a = 1\n", "", "no version key"},
		{"version 5", "version = 5\n", "", "version = 5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			cfg := filepath.Join(root, "etc/containerd/config.toml")
			write(t, cfg, tc.config)
			if tc.imported != "" {
				write(t, filepath.Join(root, "etc/containerd/more.toml"), tc.imported)
			}
			before := tree(t, root)
			o := sandboxOptions(t, root)
			o.ContainerdBin = "" // containerd itself refuses some of these: the install must first
			o.Validate()
			_, err := Install(context.Background(), o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Install: %v, want an error saying %q", err, tc.want)
			}
			if errors.Is(err, ErrRolledBack) {
				t.Errorf("refused only after changing files: %v", err)
			}
			if after := tree(t, root); len(after) != len(before) {
				t.Errorf("the sandbox changed: %v", after)
			}
		})
	}
}

// The drop-in names the CRI plugin the root config's version uses, and containerd v2.3.4
// itself reads config_path from it (after migrating a version 2 root).
func TestDropinFollowsRootVersion(t *testing.T) {
	for _, tc := range []struct {
		version string
		plugin  string
	}{{"2", CRIv2}, {"3", CRIv3}, {"4", CRIv3}} {
		t.Run("version "+tc.version, func(t *testing.T) {
			root := t.TempDir()
			write(t, filepath.Join(root, "etc/containerd/config.toml"), "version = "+tc.version+"\n")
			o := sandboxOptions(t, root)
			if _, err := Install(context.Background(), o); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(filepath.Join(root, "etc/containerd/conf.d/cove-node.toml"))
			if err != nil {
				t.Fatal(err)
			}
			m, err := decode(b)
			if err != nil {
				t.Fatal(err)
			}
			want := filepath.Join(root, "etc/containerd/certs.d")
			if got := lookupString(m, "plugins", tc.plugin, "registry", "config_path"); got != want {
				t.Errorf("drop-in config_path under %s = %q, want %q:\n%s", tc.plugin, got, want, b)
			}
			if v := m["version"]; tc.version == "2" && v != int64(2) || tc.version != "2" && v != int64(3) {
				t.Errorf("drop-in version %v for a version %s root", v, tc.version)
			}
			dumped, err := findContainerd(o.Roots, o.ContainerdBin).dump(context.Background(), filepath.Join(root, "etc/containerd/config.toml"))
			if err != nil {
				t.Fatal(err)
			}
			if got := criConfigPath(dumped); got != want {
				t.Errorf("containerd config dump: config_path %q, want %q", got, want)
			}
		})
	}
}

// containerd 1.x is refused before anything changes: its drop-ins replace whole plugin
// sections. No containerd 1.x binary is at hand, so a script answers --version as
// containerd 1.7.22 does; the refusal reads nothing else from it.
func TestInstallRefusesContainerd1(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "etc/containerd/config.toml"), "version = 2\n")
	fake := filepath.Join(t.TempDir(), "containerd")
	write(t, fake, "#!/bin/sh\necho 'containerd github.com/containerd/containerd v1.7.22 7f7fdf5fed64eb6a7caf99b3e12efcf9d60e311c'\n")
	os.Chmod(fake, 0o755)
	before := tree(t, root)
	o := sandboxOptions(t, root)
	o.ContainerdBin = fake
	_, err := Install(context.Background(), o)
	if err == nil || !strings.Contains(err.Error(), "containerd 1.7 is not supported") {
		t.Fatalf("Install with containerd 1.7: %v", err)
	}
	if after := tree(t, root); len(after) != len(before) {
		t.Errorf("the sandbox changed: %v", after)
	}
}

func TestParseVersion(t *testing.T) {
	for in, want := range map[string][2]int{
		"containerd github.com/containerd/containerd/v2 2.3.4+unknown":             {2, 3},
		"containerd containerd.io 1.6.33 d2d58213f83a351ca8f528a95fbd145f5654e957": {1, 6},
		"v2.0.0-rc.3": {2, 0},
	} {
		if ma, mi, ok := ParseVersion(in); !ok || ma != want[0] || mi != want[1] {
			t.Errorf("ParseVersion(%q) = %d.%d %v", in, ma, mi, ok)
		}
	}
	if _, _, ok := ParseVersion("containerd github.com/containerd/containerd/v2"); ok {
		t.Error("read a version from a module path")
	}
}
