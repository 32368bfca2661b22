package nodeinstall

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
)

// hostRootWithContainerd is a directory standing for a node's / as a DaemonSet mounts it:
// the real containerd at /usr/local/bin with the libraries it links (ldd), so the install
// runs it chrooted there, as it would the node's own.
func hostRootWithContainerd(t *testing.T) string {
	t.Helper()
	host := t.TempDir()
	bin := peers.Bin(t, "containerd")
	copyInto := func(src, dst string) {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		write(t, filepath.Join(host, dst), string(b))
		os.Chmod(filepath.Join(host, dst), 0o755)
	}
	copyInto(bin, "/usr/local/bin/containerd")
	out, err := exec.Command("ldd", bin).Output()
	if err != nil {
		t.Skipf("ldd %s: %v: cannot build a host root to chroot into", bin, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				real, err := filepath.EvalSymlinks(f)
				if err != nil {
					t.Fatal(err)
				}
				copyInto(real, f)
			}
		}
	}
	return host
}

// --host-root: files under the mount, configs naming the node's own paths, containerd
// checking the result chrooted into the node's /, and an uninstall that gives the files
// back byte for byte.
func TestHostRootInstallUninstall(t *testing.T) {
	host := hostRootWithContainerd(t)
	write(t, filepath.Join(host, "etc/containerd/config.toml"), "version = 3\nroot = \"/var/lib/containerd\"\n# the node's\n")
	write(t, filepath.Join(host, "etc/containerd/certs.d/_default/hosts.toml"), "# ours\n[host.\"https://mirror.example.com\"]\n")
	write(t, filepath.Join(host, "etc/containerd/certs.d/ghcr.io/hosts.toml"), "server = \"https://ghcr.io\"\n")
	before := tree(t, host)

	o := sandboxOptions(t, t.TempDir())
	o.RootDir, o.HostRoot, o.ContainerdBin = "", host, ""
	var out bytes.Buffer
	o.Out, o.Err = &out, &out
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	res, err := Install(context.Background(), o)
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if !res.RestartContainerd || !strings.Contains(out.String(), "containerd must be restarted") {
		t.Errorf("the install does not say containerd must be restarted (%+v):\n%s", res, out.String())
	}
	if !strings.Contains(out.String(), "checked: containerd 2.") {
		t.Errorf("containerd, chrooted into the host root, did not check the result:\n%s", out.String())
	}
	cfg, _ := os.ReadFile(filepath.Join(host, "etc/containerd/config.toml"))
	if !strings.Contains(string(cfg), `imports = ["/etc/containerd/conf.d/cove-node.toml"]`) {
		t.Errorf("root config imports a path that is not the node's:\n%s", cfg)
	}
	dropin, _ := os.ReadFile(filepath.Join(host, "etc/containerd/conf.d/cove-node.toml"))
	if !strings.Contains(string(dropin), `config_path = "/etc/containerd/certs.d"`) {
		t.Errorf("drop-in:\n%s", dropin)
	}
	unit, _ := os.ReadFile(filepath.Join(host, UnitPath))
	if !strings.Contains(string(unit), "ExecStart=/usr/local/bin/cove-node serve") || !strings.Contains(string(unit), "--root /var/lib/cove-node") {
		t.Errorf("unit:\n%s", unit)
	}
	if ghcr, _ := os.ReadFile(filepath.Join(host, "etc/containerd/certs.d/ghcr.io/hosts.toml")); string(ghcr) != "server = \"https://ghcr.io\"\n" {
		t.Errorf("another registry's hosts.toml changed: %q", ghcr)
	}
	installed := tree(t, host)
	out.Reset()
	if res, err := Install(context.Background(), o); err != nil || res.Changed {
		t.Fatalf("second install: %+v, %v\n%s", res, err, out.String())
	}
	if !reflect.DeepEqual(installed, tree(t, host)) {
		t.Error("the second install changed files")
	}
	if err := Uninstall(context.Background(), &UninstallOptions{Roots: Roots{HostRoot: host}, NoRestart: true, Out: &out, Err: &out}); err != nil {
		t.Fatal(err)
	}
	if after := tree(t, host); !reflect.DeepEqual(before, after) {
		t.Errorf("uninstall: the host root is not as it was")
	}
}

// An uninstall whose backup of a modified file is gone restores the rest, keeps the
// backup directory and says it is not finished.
func TestUninstallWithoutBackupIsIncomplete(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "etc/containerd/config.toml"), "version = 3\n")
	o := sandboxOptions(t, root)
	if _, err := Install(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(root, BackupDir, "files/etc/containerd/config.toml"))
	err := Uninstall(context.Background(), &UninstallOptions{Roots: Roots{RootDir: root}, NoRestart: true})
	if !errors.Is(err, ErrIncomplete) {
		t.Fatalf("Uninstall: %v, want ErrIncomplete", err)
	}
	if _, err := os.Stat(filepath.Join(root, BackupDir, "manifest")); err != nil {
		t.Errorf("the manifest went with an unfinished uninstall: %v", err)
	}
	if _, err := os.Stat(filepath.Join(root, "etc/containerd/conf.d/cove-node.toml")); !os.IsNotExist(err) {
		t.Errorf("the drop-in is still there: %v", err)
	}
}

// A manifest line that is not KIND \t ROLE \t /PATH stops the uninstall before it changes
// anything.
func TestUninstallRefusesABadManifest(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, BackupDir, "manifest"), "new\tunit\trelative/path\n")
	before := tree(t, root)
	if err := Uninstall(context.Background(), &UninstallOptions{Roots: Roots{RootDir: root}, NoRestart: true}); err == nil || !strings.Contains(err.Error(), "unreadable line") {
		t.Fatalf("Uninstall: %v", err)
	}
	if !reflect.DeepEqual(before, tree(t, root)) {
		t.Error("the uninstall changed files")
	}
}
