package nodeinstall

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/errdefs"
)

// containerd is the containerd binary that checks configurations: `containerd config
// dump` loads a root config with its imports exactly as the daemon will.
type containerd struct {
	bin string
	// chroot is the node's / when it is mounted elsewhere (--host-root): the binary and
	// every path in the config are the node's, so containerd runs chrooted there.
	chroot string
}

// findContainerd returns the binary named, or the first on PATH, /usr/local/bin or
// /usr/bin (the node's, under --host-root); bin is "" when there is none.
func findContainerd(r Roots, named string) containerd {
	if named != "" {
		return containerd{bin: named}
	}
	if r.hosted() {
		for _, c := range []string{"/usr/local/bin/containerd", "/usr/bin/containerd", "/bin/containerd"} {
			if st, err := os.Stat(r.File(c)); err == nil && st.Mode()&0o111 != 0 {
				return containerd{bin: c, chroot: r.HostRoot}
			}
		}
		return containerd{}
	}
	if p, err := exec.LookPath("containerd"); err == nil {
		return containerd{bin: p}
	}
	for _, c := range []string{"/usr/local/bin/containerd", "/usr/bin/containerd"} {
		if st, err := os.Stat(c); err == nil && st.Mode()&0o111 != 0 {
			return containerd{bin: c}
		}
	}
	return containerd{}
}

func (c containerd) run(ctx context.Context, args ...string) ([]byte, []byte, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	name, argv := c.bin, args
	if c.chroot != "" {
		name, argv = "chroot", append([]string{c.chroot, c.bin}, args...)
	}
	cmd := exec.CommandContext(ctx, name, argv...)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	err := cmd.Run()
	return out.Bytes(), stderr.Bytes(), err
}

var versionRE = regexp.MustCompile(`\sv?([0-9]+)\.([0-9]+)\.[0-9]+`)

// ParseVersion reads major and minor from `containerd --version` (or a daemon's version
// string, "v2.3.4").
func ParseVersion(s string) (major, minor int, ok bool) {
	m := versionRE.FindStringSubmatch(" " + s)
	if m == nil {
		return 0, 0, false
	}
	major, _ = strconv.Atoi(m[1])
	minor, _ = strconv.Atoi(m[2])
	return major, minor, true
}

// ErrContainerd1 is the refusal of containerd 1.x: its drop-ins replace whole plugin
// sections (services/server/config/config.go, mergeConfig, v1.7.x), so a drop-in setting
// registry.config_path would wipe the node's whole CRI configuration.
func errContainerd1(major, minor int) error {
	return fmt.Errorf("containerd %d.%d is not supported (2.0 or later is): containerd 1.x replaces a whole plugin section with a drop-in's, so the drop-in would erase this node's CRI settings. See docs/install.md: %w", major, minor, errdefs.ErrNotImplemented)
}

// version runs `containerd --version`: "2.3" (or "" when it prints none it can read).
func (c containerd) version(ctx context.Context) (string, error) {
	out, _, err := c.run(ctx, "--version")
	if err != nil {
		return "", fmt.Errorf("%s --version failed: %v", c.bin, err)
	}
	major, minor, ok := ParseVersion(string(out))
	if !ok {
		return "", nil
	}
	if major < 2 {
		return "", errContainerd1(major, minor)
	}
	return fmt.Sprintf("%d.%d", major, minor), nil
}

// dump is containerd's own view of root config cfg (as containerd names it) with its
// imports, decoded.
func (c containerd) dump(ctx context.Context, cfg string) (map[string]any, error) {
	out, stderr, err := c.run(ctx, "--config", cfg, "config", "dump")
	if err != nil {
		var lines []string
		for _, l := range strings.Split(strings.TrimSpace(string(stderr)), "\n") {
			if !strings.Contains(l, "level=warning") {
				lines = append(lines, l)
			}
		}
		if len(lines) > 5 {
			lines = lines[len(lines)-5:]
		}
		return nil, fmt.Errorf("%v: %s", err, strings.Join(lines, "\n"))
	}
	m, err := decode(out)
	if err != nil {
		return nil, fmt.Errorf("containerd config dump printed what does not parse (%v)", err)
	}
	return m, nil
}

// criConfigPath is CRI's registry config_path in a (dumped) config, either plugin id.
func criConfigPath(m map[string]any) string {
	if p := lookupString(m, "plugins", CRIv3, "registry", "config_path"); p != "" {
		return p
	}
	return lookupString(m, "plugins", CRIv2, "registry", "config_path")
}

// configFiles walks root config cfg (a host path) and what it imports, as containerd
// does, except skip; resolve maps an import as containerd names it to a host path, and
// back. It calls visit with each file's host path and decoded tables.
func configFiles(cfg, skip string, conf func(string) string, file func(string) string, visit func(path string, m map[string]any) error) error {
	queue, seen := []string{cfg}, map[string]bool{}
	for len(queue) > 0 {
		f := queue[0]
		queue = queue[1:]
		if seen[f] || f == skip {
			continue
		}
		seen[f] = true
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("%s is imported by the containerd config but cannot be read (%v): containerd cannot start with this config", f, err)
		}
		m, err := decode(b)
		if err != nil {
			return fmt.Errorf("%s is not valid TOML (%v): containerd cannot load it; fix it first", f, err)
		}
		if err := visit(f, m); err != nil {
			return err
		}
		imps, _ := m["imports"].([]any)
		for _, i := range imps {
			s, ok := i.(string)
			if !ok {
				return fmt.Errorf("%s: imports holds a value that is not a string", f)
			}
			p := resolveImport(conf(f), s)
			if strings.Contains(p, "*") {
				matches, _ := filepath.Glob(file(p))
				queue = append(queue, matches...)
			} else {
				queue = append(queue, file(p))
			}
		}
	}
	return nil
}

// grpcAddress is containerd's gRPC socket in a config: version 4 (containerd 2.3's
// dump) keeps it in the gRPC server plugin, earlier versions in [grpc].
func grpcAddress(m map[string]any) string {
	if a := lookupString(m, "plugins", "io.containerd.server.v1.grpc", "address"); a != "" {
		return a
	}
	return lookupString(m, "grpc", "address")
}
