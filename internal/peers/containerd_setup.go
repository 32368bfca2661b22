package peers

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// ContainerdSetup holds what StartContainerdWith adds to StartContainerd.
type ContainerdSetup struct {
	// Root, if set, is containerd's root directory instead of a fresh one: a test can
	// stop a containerd and start another on the same root (images, content and
	// snapshots kept), for example with a different content plugin.
	Root string
	// Imports are drop-in config files (version 3) containerd merges into the
	// generated config, through its top-level `imports` list, exactly as it merges
	// /etc/containerd/conf.d files: lists such as disabled_plugins are appended,
	// proxy_plugins entries replaced by name, plugin tables merged key by key
	// (cmd/containerd/server/config/config.go, mergeConfig). This is how a
	// fragment that disables a built-in plugin is tested: WithExtraConfig cannot add
	// a top-level key.
	Imports []string
}

// StartContainerdWith is StartContainerd with a chosen root and imported drop-ins.
func StartContainerdWith(t testing.TB, setup ContainerdSetup, opts ...ContainerdOption) *Containerd {
	t.Helper()
	var cfg containerdConfig
	for _, o := range opts {
		o(&cfg)
	}
	bin := Bin(t, "containerd")
	Bin(t, "ctr")
	base := t.TempDir()
	sockDir := shortTempDir(t)
	root := setup.Root
	if root == "" {
		root = filepath.Join(base, "root")
	}
	c := &Containerd{
		Address:    filepath.Join(sockDir, "c.sock"),
		Root:       root,
		State:      filepath.Join(sockDir, "state"),
		HostsDir:   filepath.Join(base, "hosts.d"),
		ConfigPath: filepath.Join(base, "config.toml"),
		LogPath:    filepath.Join(base, "containerd.log"),
		dir:        sockDir,
	}
	cniDir := filepath.Join(base, "cni")
	for _, d := range []string{c.Root, c.State, c.HostsDir, cniDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatalf("peers: %v", err)
		}
	}
	if len(cfg.mirrors) > 0 {
		if err := os.MkdirAll(filepath.Join(c.HostsDir, "_default"), 0o755); err != nil {
			t.Fatalf("peers: %v", err)
		}
		if err := os.WriteFile(filepath.Join(c.HostsDir, "_default", "hosts.toml"), []byte(cfg.hostsTOML()), 0o644); err != nil {
			t.Fatalf("peers: %v", err)
		}
	}
	toml := cfg.toml(c.Root, c.State, c.Address, c.HostsDir, cniDir)
	if len(setup.Imports) > 0 {
		var q []string
		for _, p := range setup.Imports {
			abs, err := filepath.Abs(p)
			if err != nil {
				t.Fatalf("peers: %v", err)
			}
			q = append(q, strconv.Quote(abs))
		}
		const head = "version = 3\n"
		if !strings.HasPrefix(toml, head) {
			t.Fatalf("peers: generated config does not start with %q", head)
		}
		toml = head + "imports = [" + strings.Join(q, ", ") + "]\n" + strings.TrimPrefix(toml, head)
	}
	if err := os.WriteFile(c.ConfigPath, []byte(toml), 0o644); err != nil {
		t.Fatalf("peers: %v", err)
	}
	c.start(t, bin)
	return c
}

// RunCtr runs `ctr --address Address --namespace Namespace args...` and returns its
// combined output; a failure carries the output and the tail of containerd's log.
func (c *Containerd) RunCtr(ctx context.Context, args ...string) ([]byte, error) {
	out, err := c.ctr(ctx, args...)
	if err != nil {
		return out, c.failure("ctr "+strings.Join(args, " "), out, err)
	}
	return out, nil
}

// DumpConfig returns `containerd config dump` for this instance's config: the
// configuration after imports were merged.
func (c *Containerd) DumpConfig(ctx context.Context) (string, error) {
	out, err := runTool(ctx, filepath.Join(ToolsDir(), "containerd"), "--config", c.ConfigPath, "config", "dump")
	if err != nil {
		return "", fmt.Errorf("containerd config dump: %w\n%s", err, out)
	}
	return string(out), nil
}
