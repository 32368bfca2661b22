package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/plugin/nodeinstall"
)

// doctorNode is a sandbox node: a containerd config under root, the cove-cache cove-node
// forwards to, and the origin behind it.
type doctorNode struct {
	root   string
	layout peers.ContainerdLayout
	origin *peers.Registry
	img    peers.Image
	cache  *peers.Cove
	addr   string
}

func newDoctorNode(t *testing.T) *doctorNode {
	t.Helper()
	n := &doctorNode{root: t.TempDir(), layout: peers.NewContainerdLayout(t)}
	n.origin = peers.StartRegistry(t)
	n.img = peers.PushRandomImage(t, n.origin.Addr, "team/doctor:v1", 1, 256<<10)
	n.cache = peers.StartCove(t, "", "--origin-plain-http", n.origin.Addr)
	cfg := filepath.Join(n.root, "etc/containerd/config.toml")
	if err := os.MkdirAll(filepath.Dir(cfg), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, []byte(n.layout.BaseConfig(3)), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n.addr = l.Addr().String()
	l.Close()
	return n
}

func (n *doctorNode) config() string { return filepath.Join(n.root, "etc/containerd/config.toml") }

// install runs cove-node install into the sandbox.
func (n *doctorNode) install(t *testing.T) {
	t.Helper()
	var out, errb bytes.Buffer
	args := []string{"install", "--root-dir", n.root, "--no-restart", "--binary", peers.CoveBinary(t, "cove-node"),
		"--cache", n.cache.URL, "--addr", n.addr, "--origin-plain-http", n.origin.Addr,
		"--containerd-bin", peers.Bin(t, "containerd")}
	if code := run(args, &out, &errb); code != 0 {
		t.Fatalf("cove-node install: %d\n%s%s", code, out.String(), errb.String())
	}
}

// startCoveNode runs cove-node as the installed unit says.
func (n *doctorNode) startCoveNode(t *testing.T) *peers.CoveNode {
	t.Helper()
	unit, err := os.ReadFile(filepath.Join(n.root, nodeinstall.UnitPath))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(unit), "\n") {
		if cmd, ok := strings.CutPrefix(line, "ExecStart="); ok {
			return peers.StartCoveNodeCommand(t, strings.Fields(cmd))
		}
	}
	t.Fatalf("no ExecStart in the unit:\n%s", unit)
	return nil
}

// doctor runs cove-node doctor on the sandbox and returns its exit status and its lines
// by check name.
func (n *doctorNode) doctor(t *testing.T) (int, map[string]string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run([]string{"doctor", "--root-dir", n.root, "--containerd-bin", peers.Bin(t, "containerd")}, &out, &errb)
	lines := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			t.Fatalf("doctor printed %q", l)
		}
		name, _, _ := strings.Cut(strings.TrimSpace(strings.TrimPrefix(l, f[0])), ":")
		lines[name] = l
	}
	return code, lines, out.String() + errb.String()
}

// verdict is the verdict doctor gave check name ("" when it printed none).
func verdict(lines map[string]string, name string) string {
	if l, ok := lines[name]; ok {
		return strings.Fields(l)[0]
	}
	return ""
}

// A node configured right: every check is ok, exit status 0, and a CRI pull really goes
// through cove-node to the cache. Then the ways the mirror goes silently unused, each
// from that node: cove-node down, hosts.toml gone; each fails its check with exit status 1.
func TestDoctorConfiguredRight(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n := newDoctorNode(t)
	n.install(t)
	node := n.startCoveNode(t)
	ctd := peers.StartContainerdWithConfig(t, n.config(), n.layout, filepath.Join(n.root, "etc/containerd/certs.d"))

	code, lines, out := n.doctor(t)
	t.Logf("doctor:\n%s", out)
	if code != 0 {
		t.Errorf("exit status %d on a node configured right", code)
	}
	for _, name := range []string{"containerd", "config_path", "pull path", "hosts.toml", "cove-node"} {
		if verdict(lines, name) != "ok" {
			t.Errorf("check %q: %q, want ok", name, lines[name])
		}
	}
	if _, err := ctd.CRIPull(ctx, n.img.Ref, nil); err != nil {
		t.Fatal(err)
	}
	if got := node.Metric(t, "cove_node_requests_total", `served_by="cache"`); got == 0 {
		t.Fatalf("doctor said ok, but a CRI pull did not go through cove-node\n%s", ctd.Log())
	}
	if _, lines, _ := n.doctor(t); !strings.Contains(lines["cove-node"], "requests so far: cache ") || strings.Contains(lines["cove-node"], "cache 0,") {
		t.Errorf("doctor's probe does not count the pull: %s", lines["cove-node"])
	}

	// cove-node down: containerd skips the mirror.
	node.Stop()
	code, lines, out = n.doctor(t)
	if code != 1 || verdict(lines, "cove-node") != "fail" || !strings.Contains(lines["cove-node"], "fix:") {
		t.Errorf("cove-node stopped: exit status %d, want 1 and a failed cove-node check with its fix\n%s", code, out)
	}
	node = n.startCoveNode(t)

	// hosts.toml gone: containerd pulls straight from the registry.
	hosts := filepath.Join(n.root, "etc/containerd/certs.d/_default/hosts.toml")
	saved, err := os.ReadFile(hosts)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(hosts)
	code, lines, out = n.doctor(t)
	if code != 1 || verdict(lines, "hosts.toml") != "fail" {
		t.Errorf("hosts.toml removed: exit status %d, want 1 and a failed hosts.toml check\n%s", code, out)
	}
	// hosts.toml without cove-node (another mirror only).
	os.WriteFile(hosts, []byte("[host.\"https://mirror.example.com\"]\n"), 0o644)
	if code, lines, out = n.doctor(t); code != 1 || verdict(lines, "hosts.toml") != "fail" {
		t.Errorf("hosts.toml without cove-node: exit status %d\n%s", code, out)
	}
	// cove-node listed second: pulls still go through it, after the first host fails.
	os.WriteFile(hosts, []byte("[host.\"https://mirror.example.com\"]\n"+nodeinstall.HostsBlock(n.addr)), 0o644)
	if code, lines, out = n.doctor(t); code != 0 || verdict(lines, "hosts.toml") != "warn" {
		t.Errorf("cove-node second in hosts.toml: exit status %d, want 0 and a warning\n%s", code, out)
	}
	os.WriteFile(hosts, saved, 0o644)
	if code, _, out = n.doctor(t); code != 0 {
		t.Errorf("hosts.toml back: exit status %d\n%s", code, out)
	}
}

// A node where containerd reads no hosts directory: a CRI pull goes straight to the
// registry, and doctor fails config_path. Then cove-node is installed while containerd
// runs (--no-restart): containerd still runs on the old configuration, a pull still
// bypasses cove-node, and doctor says containerd must be restarted; after the restart
// pulls go through cove-node and doctor passes.
func TestDoctorMirrorSilentlyUnused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n := newDoctorNode(t)
	ctd := peers.StartContainerdWithConfig(t, n.config(), n.layout, filepath.Join(n.root, "etc/containerd/certs.d"))

	code, lines, out := n.doctor(t)
	t.Logf("doctor before the install:\n%s", out)
	if code != 1 || verdict(lines, "config_path") != "fail" || verdict(lines, "containerd") != "ok" {
		t.Errorf("no config_path: exit status %d, want 1, a failed config_path and an ok containerd", code)
	}

	time.Sleep(1100 * time.Millisecond) // the install's files must be newer than containerd's start, to the second
	n.install(t)
	node := n.startCoveNode(t)
	code, lines, out = n.doctor(t)
	t.Logf("doctor after the install, containerd not restarted:\n%s", out)
	if code != 1 || verdict(lines, "containerd restart") != "fail" {
		t.Errorf("containerd not restarted: exit status %d, want 1 and a failed containerd restart check", code)
	}
	if _, err := ctd.CRIPull(ctx, n.img.Ref, nil); err != nil {
		t.Fatal(err)
	}
	if got := node.Metric(t, "cove_node_requests_total"); got != 0 {
		t.Fatalf("containerd running on its old configuration sent %v requests to cove-node: the doctor's verdict is wrong", got)
	}

	ctd.Stop()
	ctd = peers.StartContainerdWithConfig(t, n.config(), n.layout, filepath.Join(n.root, "etc/containerd/certs.d"))
	if code, _, out = n.doctor(t); code != 0 {
		t.Errorf("after the restart: exit status %d\n%s", code, out)
	}
	if err := ctd.RemoveImage(ctx, n.img.Ref); err != nil {
		t.Fatal(err)
	}
	if _, err := ctd.CRIPull(ctx, n.img.Ref, nil); err != nil {
		t.Fatal(err)
	}
	if got := node.Metric(t, "cove_node_requests_total", `served_by="cache"`); got == 0 {
		t.Errorf("after the restart a CRI pull did not go through cove-node")
	}
}
