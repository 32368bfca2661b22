package peers

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// ContainerdLayout is where a containerd started from a config file someone else wrote
// (StartContainerdWithConfig) keeps its files: BaseConfig puts these paths in the
// config, so a test can hand the config to an installer that edits it, then run
// containerd from the edited file.
type ContainerdLayout struct {
	// Root and State are containerd's root and state directories; Address is its gRPC
	// socket. State and Address live in a short directory under /tmp (unix socket paths
	// are limited to 108 bytes), removed at cleanup.
	Root, State, Address string
	// CNIDir is the CNI bin and conf directory (empty: crictl pull needs no network).
	CNIDir string

	dir string // the short socket directory: killByArg and crictl.yaml use it
}

// NewContainerdLayout makes the directories of a throwaway containerd, removed at cleanup.
func NewContainerdLayout(t testing.TB) ContainerdLayout {
	t.Helper()
	base := t.TempDir()
	sockDir := shortTempDir(t)
	l := ContainerdLayout{
		Root:    filepath.Join(base, "root"),
		State:   filepath.Join(sockDir, "state"), // shim sockets live here: keep it short
		Address: filepath.Join(sockDir, "c.sock"),
		CNIDir:  filepath.Join(base, "cni"),
		dir:     sockDir,
	}
	for _, d := range []string{l.Root, l.State, l.CNIDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatalf("peers: %v", err)
		}
	}
	return l
}

// BaseConfig returns a containerd config.toml of the given version (3, or 2 for the
// pre-2.0 layout containerd 2.x still reads) for this layout: the same settings
// StartContainerd writes (plugins disabled for a fast boot, the CRI image service on
// overlayfs, no TCP streaming port, NRI off) except that it sets no registry
// config_path at all, neither CRI's nor the transfer service's. It is the "node as it
// was before cove" an installer starts from.
//
// Version 2 puts every CRI setting under the single io.containerd.grpc.v1.cri plugin,
// which containerd 2.x migrates at load time to io.containerd.cri.v1.images and
// io.containerd.cri.v1.runtime (plugins/cri/images and plugins/cri/runtime,
// configMigration).
func (l ContainerdLayout) BaseConfig(version int) string {
	q := strconv.Quote
	var b strings.Builder
	writeConfigHead(&b, version, l.Root, l.State, l.Address)
	switch version {
	case 2:
		b.WriteString("  [plugins.\"io.containerd.grpc.v1.cri\"]\n")
		b.WriteString("    disable_tcp_service = true\n    stream_server_address = \"127.0.0.1\"\n    stream_server_port = \"0\"\n")
		b.WriteString("    cdi_spec_dirs = []\n    netns_mounts_under_state_dir = true\n")
		b.WriteString("    [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n      snapshotter = \"overlayfs\"\n")
		fmt.Fprintf(&b, "    [plugins.\"io.containerd.grpc.v1.cri\".cni]\n      bin_dir = %s\n      conf_dir = %s\n", q(l.CNIDir), q(l.CNIDir))
	default:
		b.WriteString("  [plugins.\"io.containerd.cri.v1.images\"]\n    snapshotter = \"overlayfs\"\n")
		b.WriteString("\n  [plugins.\"io.containerd.cri.v1.runtime\"]\n")
		b.WriteString("    cdi_spec_dirs = []\n    netns_mounts_under_state_dir = true\n")
		fmt.Fprintf(&b, "    [plugins.\"io.containerd.cri.v1.runtime\".cni]\n      bin_dirs = [%s]\n      conf_dir = %s\n", q(l.CNIDir), q(l.CNIDir))
		b.WriteString("\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    disable_tcp_service = true\n    stream_server_address = \"127.0.0.1\"\n    stream_server_port = \"0\"\n")
	}
	b.WriteString("\n  [plugins.\"io.containerd.nri.v1.nri\"]\n    disable = true\n")
	return b.String()
}

// StartContainerdWithConfig starts containerd with --config configPath, a file the test
// (or an installer under test) wrote for layout l, waits until its API answers, and
// stops it at cleanup like StartContainerd. hostsDir is what Pull passes to ctr as
// --hosts-dir; CRI (CrictlPull) reads whatever registry config_path the config sets.
func StartContainerdWithConfig(t testing.TB, configPath string, l ContainerdLayout, hostsDir string) *Containerd {
	t.Helper()
	bin := Bin(t, "containerd")
	Bin(t, "ctr")
	if l.dir == "" {
		t.Fatalf("peers: StartContainerdWithConfig needs a layout from NewContainerdLayout")
	}
	c := &Containerd{
		Address:    l.Address,
		Root:       l.Root,
		State:      l.State,
		HostsDir:   hostsDir,
		ConfigPath: configPath,
		LogPath:    filepath.Join(t.TempDir(), "containerd.log"),
		dir:        l.dir,
	}
	c.start(t, bin)
	return c
}

// start writes crictl's config beside the socket (CrictlPull passes it, so crictl never
// reads /etc/crictl.yaml), runs containerd with c.ConfigPath until cleanup, and waits
// for its socket.
func (c *Containerd) start(t testing.TB, bin string) {
	t.Helper()
	ep := "unix://" + c.Address
	crictlYAML := fmt.Sprintf("runtime-endpoint: %s\nimage-endpoint: %s\ntimeout: 600\n", ep, ep)
	if err := os.WriteFile(filepath.Join(c.dir, "crictl.yaml"), []byte(crictlYAML), 0o644); err != nil {
		t.Fatalf("peers: %v", err)
	}
	p, err := startProc("containerd", bin, []string{"--config", c.ConfigPath}, cleanEnv(),
		c.LogPath, c.LogPath, 10*time.Second)
	if err != nil {
		t.Fatalf("peers: %v", err)
	}
	c.proc = p
	t.Cleanup(c.Stop)
	if err := waitUnix(p, c.Address, 20*time.Second); err != nil {
		c.Stop()
		t.Fatalf("peers: containerd did not start: %v\nconfig %s\ncontainerd log %s (tail):\n%s",
			err, c.ConfigPath, c.LogPath, logTail(c.LogPath, 40))
	}
}

// Log returns containerd's log so far.
func (c *Containerd) Log() string {
	b, _ := os.ReadFile(c.LogPath)
	return string(b)
}

// RemoveImage deletes ref and every other image record with the same target, then,
// synchronously, the content only they referenced (`ctr images rm --sync`), so the next
// pull of ref downloads every blob again. The other records matter: when an image
// appears in its namespace (k8s.io), CRI adds one named by the image ID
// (sha256:<config digest>, label io.cri-containerd.image=managed), which keeps the
// content alive after ref alone is gone.
func (c *Containerd) RemoveImage(ctx context.Context, ref string) error {
	target, err := c.ImageTarget(ctx, ref)
	if err != nil {
		return err
	}
	// CRI adds its record from an event, a moment after the pull: look twice.
	for attempt := 0; attempt < 2; attempt++ {
		out, err := c.ctr(ctx, "images", "ls")
		if err != nil {
			return c.failure("ctr images ls", out, err)
		}
		var refs []string
		for _, line := range strings.Split(string(out), "\n") {
			if f := strings.Fields(line); len(f) >= 3 && f[2] == target {
				refs = append(refs, f[0])
			}
		}
		if len(refs) > 0 {
			out, err = c.ctr(ctx, append([]string{"images", "rm", "--sync"}, refs...)...)
			if err != nil {
				return c.failure("ctr images rm "+strings.Join(refs, " "), out, err)
			}
		}
		select {
		case <-time.After(200 * time.Millisecond):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// ContentDigests lists the digests in containerd's content store (`ctr content ls`).
func (c *Containerd) ContentDigests(ctx context.Context) ([]string, error) {
	out, err := c.ctr(ctx, "content", "ls", "--quiet")
	if err != nil {
		return nil, c.failure("ctr content ls", out, err)
	}
	return strings.Fields(string(out)), nil
}

// StartCoveNodeCommand runs a cove-node command line given in full, binary first (for
// example the ExecStart of an installed systemd unit), waits until /healthz answers on
// the address its --addr flag names, and stops it at cleanup like StartCoveNode.
func StartCoveNodeCommand(t testing.TB, argv []string) *CoveNode {
	t.Helper()
	if len(argv) < 2 {
		t.Fatalf("peers: StartCoveNodeCommand: no command line")
	}
	addr := ""
	for i, a := range argv {
		if a == "--addr" && i+1 < len(argv) {
			addr = argv[i+1]
		} else if v, ok := strings.CutPrefix(a, "--addr="); ok {
			addr = v
		}
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		t.Fatalf("peers: StartCoveNodeCommand: no usable --addr in %q", argv)
	}
	logPath := filepath.Join(t.TempDir(), "cove-node.log")
	p, err := startProc("cove-node", argv[0], argv[1:], cleanEnv(), logPath, logPath, 5*time.Second)
	if err != nil {
		t.Fatalf("peers: start cove-node: %v", err)
	}
	return awaitCoveNode(t, p, addr, logPath)
}

// awaitCoveNode takes charge of a started cove-node process p (stopped at cleanup) and
// waits until its /healthz answers on addr.
func awaitCoveNode(t testing.TB, p *proc, addr, logPath string) *CoveNode {
	t.Helper()
	n := &CoveNode{Addr: addr, URL: "http://" + addr, LogPath: logPath, proc: p}
	t.Cleanup(n.Stop)
	if err := waitHTTP(p, n.URL+"/healthz", 10*time.Second); err != nil {
		n.Stop()
		t.Fatalf("peers: cove-node did not become ready: %v\n%s", err, logTail(logPath, 30))
	}
	return n
}
