package nodeinstall

import (
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
)

// Node paths the install manages (under the root, see Options).
const (
	BinPath          = "/usr/local/bin/cove-node"
	UnitName         = "cove-node.service"
	UnitPath         = "/etc/systemd/system/cove-node.service"
	SocketUnitName   = "cove-node.socket"
	SocketUnitPath   = "/etc/systemd/system/cove-node.socket"
	CacheCAPath      = "/etc/cove-node/cache-ca.pem"
	ContentSocket    = "/run/cove-node/content.sock"
	StateDir         = "/var/lib/cove-node"
	BackupDir        = "/var/lib/cove-node/install-backup"
	DefaultAddr      = "127.0.0.1:5006"
	DefaultHostsDir  = "/etc/containerd/certs.d"
	DefaultConfig    = "/etc/containerd/config.toml"
	ctdDefaultRoot   = "/var/lib/containerd"
	ctdDefaultSocket = "/run/containerd/containerd.sock"
)

// The CRI plugins that read registry.config_path: version 2 configs name the single CRI
// plugin, version 3 and later the CRI image service (containerd 2.x migrates the former).
const (
	CRIv2 = "io.containerd.grpc.v1.cri"
	CRIv3 = "io.containerd.cri.v1.images"
)

// Roots says where the node's files are and how configs name them. RootDir is a sandbox
// that stands for / (tests): files are under it, and every path written into a config
// file carries it too, so a containerd started in the sandbox finds them. HostRoot is the
// node's / mounted elsewhere (a DaemonSet's hostPath /host): files are under it, and
// configs name them as the node sees them. At most one is set.
type Roots struct {
	RootDir  string
	HostRoot string
}

// File is the path of node path p on this machine.
func (r Roots) File(p string) string {
	base := r.RootDir
	if base == "" {
		base = r.HostRoot
	}
	if base == "" || base == "/" {
		return p
	}
	return base + p
}

// Conf is node path p as containerd and systemd on the node read it.
func (r Roots) Conf(p string) string {
	if r.RootDir == "" || r.RootDir == "/" {
		return p
	}
	return r.RootDir + p
}

// sandboxed says whether services on this machine are not the node's (a --root-dir).
func (r Roots) sandboxed() bool { return r.RootDir != "" && r.RootDir != "/" }

// hosted says whether the node's / is mounted elsewhere (a --host-root).
func (r Roots) hosted() bool { return r.HostRoot != "" && r.HostRoot != "/" }

// Options are an install's settings (cove-node install's flags).
type Options struct {
	Roots
	// NoRestart touches no service: the install says what to run instead.
	NoRestart bool
	// Systemctl is the command that runs systemctl on the node (default "systemctl"; from
	// a pod, for example nsenter --target 1 --mount --pid -- systemctl).
	Systemctl []string
	// ContentHook also makes cove-node containerd's content store and differ.
	ContentHook bool
	// Binary is the cove-node binary to install.
	Binary  string
	Caches  []string
	CacheCA string // PEM bundle for https caches ("" none)
	// CachesFrom is NAMESPACE/SERVICE for cove-node's --caches-from-endpointslices ("" none)
	// and CachesPortName its --caches-port-name; cove-node reads the API with Kubeconfig
	// (a node path), or with the kubeconfig the install writes for KubeTokenFile (a node
	// path; the API server's CA read from KubeCAFile, in the pod). See caches.go.
	CachesFrom, CachesPortName string
	Kubeconfig, KubeTokenFile  string
	KubeCAFile                 string
	Addr                       string
	// MetricsAddr is cove-node's --metrics-addr, the listener that serves /metrics alone
	// and may be off loopback ("" none).
	MetricsAddr string
	PlainHTTP   []string
	HostsDir    string
	// ContainerdConfig is containerd's root config; ContainerdBin the binary that checks
	// the result ("" finds one).
	ContainerdConfig string
	ContainerdBin    string
	// Arch is the node's architecture for the content hook's unpack platform.
	Arch string
	// Prog names the command in messages; Out takes progress, Err warnings.
	Prog     string
	Out, Err io.Writer
}

// UsageError is bad input: nothing was changed, and the command line is to blame.
type UsageError struct{ msg string }

func (e *UsageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return &UsageError{fmt.Sprintf(format, a...)} }

var plainPath = regexp.MustCompile(`^[A-Za-z0-9._/+@-]+$`)

// CleanPath checks that p is an absolute path of plain characters (it goes into TOML
// strings and a systemd command line unquoted) and returns it cleaned.
func CleanPath(name, p string) (string, error) {
	if !strings.HasPrefix(p, "/") {
		return "", usagef("%s '%s': want an absolute path", name, p)
	}
	if !plainPath.MatchString(p) {
		return "", usagef("%s '%s': only letters, digits and . _ / + @ - are allowed", name, p)
	}
	for _, c := range strings.Split(p, "/") {
		if c == "." || c == ".." {
			return "", usagef("%s '%s': no . or .. components", name, p)
		}
	}
	return filepath.Clean(p), nil
}

// checkRoots validates RootDir and HostRoot (shared by install, uninstall and doctor).
func (r *Roots) check(noRestart bool) error {
	if r.RootDir != "" && r.HostRoot != "" {
		return usagef("--root-dir and --host-root: give one")
	}
	for _, f := range []struct {
		name string
		p    *string
	}{{"--root-dir", &r.RootDir}, {"--host-root", &r.HostRoot}} {
		if *f.p == "" {
			continue
		}
		c, err := CleanPath(f.name, *f.p)
		if err != nil {
			return err
		}
		if st, err := os.Stat(c); err != nil || !st.IsDir() {
			return usagef("%s '%s' is not a directory", f.name, c)
		}
		*f.p = c
	}
	if r.sandboxed() && !noRestart {
		return usagef("--root-dir %s: services belong to the real root; add --no-restart", r.RootDir)
	}
	return nil
}

var (
	cacheURL = regexp.MustCompile(`^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:([0-9]{1,5}))?/?$`)
	loopback = regexp.MustCompile(`^(127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}|localhost|\[::1\]):([0-9]{1,5})$`)
	hostPort = regexp.MustCompile(`^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$`)
	// listenAddr is a HOST:PORT to bind: an IP address or a name, and a port.
	listenAddr = regexp.MustCompile(`^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})$`)
)

// validateCommon fills in the defaults install and uninstall share (prog names the
// command in messages) and checks the roots and the way to reach the node's systemd.
func (o *Options) validateCommon(prog string) error {
	if o.Prog == "" {
		o.Prog = prog
	}
	if o.Out == nil {
		o.Out = io.Discard
	}
	if o.Err == nil {
		o.Err = io.Discard
	}
	if len(o.Systemctl) == 0 {
		if o.hosted() && !o.NoRestart {
			return usagef("--host-root %s: systemctl here is not the node's: pass --systemctl (for example \"nsenter --target 1 --mount --pid -- systemctl\") or --no-restart", o.HostRoot)
		}
		o.Systemctl = []string{"systemctl"}
	}
	return o.Roots.check(o.NoRestart)
}

// Validate checks the options and fills in defaults; every error is a *UsageError.
func (o *Options) Validate() error {
	if err := o.validateCommon("cove-node install"); err != nil {
		return err
	}
	if o.Addr == "" {
		o.Addr = DefaultAddr
	}
	if o.HostsDir == "" {
		o.HostsDir = DefaultHostsDir
	}
	if o.ContainerdConfig == "" {
		o.ContainerdConfig = DefaultConfig
	}
	var err error
	if o.HostsDir, err = CleanPath("--hosts-dir", o.HostsDir); err != nil {
		return err
	}
	if o.ContainerdConfig, err = CleanPath("--containerd-config", o.ContainerdConfig); err != nil {
		return err
	}
	if o.HostsDir == "/" || o.ContainerdConfig == "/" {
		return usagef("--hosts-dir and --containerd-config cannot be /")
	}
	if len(o.Caches) == 0 {
		return usagef("--cache URL is required: the cove-cache to forward to (for example --cache http://cove-cache.cove-system.svc:5005)")
	}
	https := false
	for _, c := range o.Caches {
		m := cacheURL.FindStringSubmatch(c)
		if m == nil {
			return usagef("--cache '%s': want http(s)://HOST[:PORT] (no path, user or query)", c)
		}
		if m[3] != "" {
			if n, _ := strconv.Atoi(m[3]); n < 1 || n > 65535 {
				return usagef("--cache '%s': port out of range", c)
			}
		}
		if u, err := url.Parse(c); err != nil || u.Host == "" {
			return usagef("--cache '%s': want http(s)://HOST[:PORT]", c)
		}
		https = https || strings.HasPrefix(c, "https://")
	}
	if err := o.validateCachesFrom(); err != nil {
		return err
	}
	m := loopback.FindStringSubmatch(o.Addr)
	if m == nil {
		return usagef("--addr '%s': want a loopback HOST:PORT (127.0.0.1:5006, [::1]:5006, localhost:5006): cove-node serves this node's containerd only", o.Addr)
	}
	if n, _ := strconv.Atoi(m[2]); n < 1 || n > 65535 {
		return usagef("--addr '%s': port out of range", o.Addr)
	}
	if strings.HasPrefix(m[1], "127.") && net.ParseIP(m[1]) == nil {
		return usagef("--addr '%s': not an IPv4 address", o.Addr)
	}
	if err := o.validateMetricsAddr(); err != nil {
		return err
	}
	for _, h := range o.PlainHTTP {
		if !hostPort.MatchString(h) {
			return usagef("--origin-plain-http '%s': want a registry HOST:PORT", h)
		}
	}
	if o.ContentHook && len(o.Conf(ContentSocket)) > 107 {
		return usagef("--root-dir %s: the content socket %s is longer than a unix socket path can be (107 bytes)", o.RootDir, o.Conf(ContentSocket))
	}
	if o.CacheCA != "" {
		if st, err := os.Stat(o.CacheCA); err != nil || !st.Mode().IsRegular() {
			return usagef("--cache-ca '%s': no readable file there", o.CacheCA)
		}
		if !https {
			fmt.Fprintf(o.Err, "%s: warning: --cache-ca: no --cache URL is https://, so cove-node will not use the bundle\n", o.Prog)
		}
	}
	if o.Binary == "" {
		exe, err := os.Executable()
		if err != nil {
			return usagef("--binary: cannot find this program's own file (%v): name the cove-node binary", err)
		}
		o.Binary = exe
	}
	if st, err := os.Stat(o.Binary); err != nil || !st.Mode().IsRegular() || st.Mode()&0o111 == 0 {
		return usagef("--binary '%s': no executable file there", o.Binary)
	}
	if o.ContainerdBin != "" {
		if st, err := os.Stat(o.ContainerdBin); err != nil || st.Mode()&0o111 == 0 {
			return usagef("--containerd-bin '%s': not an executable", o.ContainerdBin)
		}
	}
	return nil
}

// validateMetricsAddr checks MetricsAddr: it goes into the unit's command line unquoted,
// and cove-node binds it, beside Addr.
func (o *Options) validateMetricsAddr() error {
	if o.MetricsAddr == "" {
		return nil
	}
	m := listenAddr.FindStringSubmatch(o.MetricsAddr)
	if m == nil {
		return usagef("--metrics-addr '%s': want HOST:PORT, the host an IP address of this node (or 0.0.0.0 for every interface)", o.MetricsAddr)
	}
	if n, _ := strconv.Atoi(m[2]); n < 1 || n > 65535 {
		return usagef("--metrics-addr '%s': port out of range", o.MetricsAddr)
	}
	if o.MetricsAddr == o.Addr {
		return usagef("--metrics-addr '%s' is --addr: give the metrics listener its own port", o.MetricsAddr)
	}
	return nil
}

// dropinPath is the drop-in beside the root config, as a node path.
func (o *Options) dropinPath() string {
	return filepath.Join(filepath.Dir(o.ContainerdConfig), "conf.d", "cove-node.toml")
}

// hostsTOML is the _default hosts.toml, as a node path.
func (o *Options) hostsTOML() string { return filepath.Join(o.HostsDir, "_default", "hosts.toml") }

// fileOfConf is the host path of a path as containerd on the node names it.
func (r Roots) fileOfConf(p string) string {
	if r.hosted() {
		return r.HostRoot + p
	}
	return p
}

// confOfFile is a host path as containerd on the node names it.
func (r Roots) confOfFile(hp string) string {
	if r.hosted() {
		return strings.TrimPrefix(hp, r.HostRoot)
	}
	return hp
}
