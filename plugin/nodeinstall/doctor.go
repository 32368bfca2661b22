package nodeinstall

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Verdict is a doctor check's outcome.
type Verdict string

const (
	// OK: as it should be.
	OK Verdict = "ok"
	// Warn: pulls go through cove-node, but something deserves a look.
	Warn Verdict = "warn"
	// Fail: containerd does not pull through cove-node (the mirror is silently unused),
	// or cannot run with what is there.
	Fail Verdict = "fail"
)

// Check is one line of the doctor's report.
type Check struct {
	Name    string
	Verdict Verdict
	Detail  string // what was found
	Fix     string // what to do (empty when ok)
}

func (c Check) String() string {
	s := fmt.Sprintf("%-4s %s: %s", c.Verdict, c.Name, c.Detail)
	if c.Fix != "" {
		s += " -- fix: " + c.Fix
	}
	return s
}

// DoctorOptions say where the node's containerd and cove-node are.
type DoctorOptions struct {
	Roots
	// ContainerdConfig is containerd's root config (default /etc/containerd/config.toml).
	ContainerdConfig string
	// ContainerdBin loads the config as containerd does ("" finds one, as the install).
	ContainerdBin string
	// ContainerdAddress is the running containerd's gRPC socket as the node names it (""
	// the config's grpc.address, else /run/containerd/containerd.sock).
	ContainerdAddress string
	// Addr is cove-node's address ("" from the installed unit, else 127.0.0.1:5006).
	Addr string
	// Timeout bounds each live probe (default 2 s).
	Timeout time.Duration
}

// Doctor checks whether this node's containerd pulls through cove-node, one Check per
// question: which containerd runs, whether it was restarted since its configuration
// changed, which pull path CRI takes, where CRI reads registry hosts from, whether
// _default/hosts.toml puts cove-node first, and whether cove-node answers.
func Doctor(ctx context.Context, o DoctorOptions) []Check {
	if o.ContainerdConfig == "" {
		o.ContainerdConfig = DefaultConfig
	}
	if o.Timeout <= 0 {
		o.Timeout = 2 * time.Second
	}
	d := &doctor{DoctorOptions: o}
	d.addr()
	d.checkConfig(ctx)
	d.checkDaemon(ctx)
	d.checkPullPath()
	d.checkHosts()
	d.checkCoveNode(ctx)
	d.checkMetricsListener(ctx)
	return d.checks
}

// Failed says whether any check failed: the mirror is unused or the node is broken.
func Failed(checks []Check) bool {
	for _, c := range checks {
		if c.Verdict == Fail {
			return true
		}
	}
	return false
}

// Report writes one line per check.
func Report(w io.Writer, checks []Check) {
	for _, c := range checks {
		fmt.Fprintln(w, c.String())
	}
}

type doctor struct {
	DoctorOptions
	checks     []Check
	cfg        map[string]any // containerd's merged configuration (nil: unknown)
	configPath string         // CRI's registry config_path
	files      []string       // the config files containerd loads (host paths)
	addrFrom   string
	// metricsAddr is the installed unit's --metrics-addr ("" none).
	metricsAddr string
}

func (d *doctor) add(name string, v Verdict, detail, fix string) {
	d.checks = append(d.checks, Check{Name: name, Verdict: v, Detail: detail, Fix: fix})
}

// addr finds cove-node's address: the flag, the installed unit's --addr, the default;
// and the installed unit's --metrics-addr.
func (d *doctor) addr() {
	addrFlag := d.Addr != ""
	if addrFlag {
		d.addrFrom = "--addr"
	} else {
		d.Addr, d.addrFrom = DefaultAddr, "the default"
	}
	unit, err := os.ReadFile(d.File(UnitPath))
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(unit), "\n") {
		if cmd, ok := strings.CutPrefix(line, "ExecStart="); ok {
			f := strings.Fields(cmd)
			for i := 0; i+1 < len(f); i++ {
				switch {
				case f[i] == "--addr" && !addrFlag:
					d.Addr, d.addrFrom = f[i+1], UnitPath
				case f[i] == "--metrics-addr":
					d.metricsAddr = f[i+1]
				}
			}
		}
	}
}

// checkConfig loads containerd's configuration as containerd does (config dump) and reads
// CRI's registry config_path from it.
func (d *doctor) checkConfig(ctx context.Context) {
	const name = "config_path"
	cfgFile := d.File(d.ContainerdConfig)
	if _, err := os.Stat(cfgFile); err != nil {
		d.add(name, Fail, fmt.Sprintf("no containerd config at %s: CRI reads registry hosts from no directory, so no pull uses cove-node", cfgFile),
			"run cove-node install (or install/node.sh)")
		return
	}
	configFiles(cfgFile, "", d.confOfFile, d.fileOfConf, func(f string, _ map[string]any) error {
		d.files = append(d.files, f)
		return nil
	})
	ctd := findContainerd(d.Roots, d.ContainerdBin)
	if ctd.bin != "" {
		m, err := ctd.dump(ctx, d.Conf(d.ContainerdConfig))
		if err != nil {
			d.add(name, Fail, fmt.Sprintf("containerd (%s) cannot load %s: %v", ctd.bin, cfgFile, err), "fix the configuration; containerd cannot start with it")
			return
		}
		d.cfg = m
	} else {
		// No binary to ask: merge what matters the way containerd does (later wins).
		d.cfg = map[string]any{}
		for _, f := range d.files {
			b, _ := os.ReadFile(f)
			m, err := decode(b)
			if err != nil {
				d.add(name, Fail, fmt.Sprintf("%s is not valid TOML (%v)", f, err), "fix it: containerd cannot load it")
				return
			}
			if p := criConfigPath(m); p != "" {
				d.cfg = m
			}
		}
	}
	d.configPath = criConfigPath(d.cfg)
	switch {
	case d.configPath == "":
		d.add(name, Fail, "containerd's CRI reads no registry hosts directory (registry config_path is not set): kubelet pulls never ask cove-node",
			"run cove-node install; if it is installed, check that the root config imports its drop-in ("+filepath.Join(filepath.Dir(d.ContainerdConfig), "conf.d", "cove-node.toml")+")")
	case strings.Contains(d.configPath, ":"):
		d.add(name, Fail, fmt.Sprintf("config_path = %q is a list: containerd's transfer service never finds _default/hosts.toml in a list", d.configPath),
			"set config_path to the one hosts directory (cove-node install does)")
	default:
		d.add(name, OK, fmt.Sprintf("CRI reads registry hosts from %s", d.configPath), "")
	}
}

// checkPullPath says which of containerd 2.x's pull paths CRI takes: both read
// config_path, but only the transfer service is used by ctr, which reads hosts.toml only
// when told (--hosts-dir).
func (d *doctor) checkPullPath() {
	if d.cfg == nil {
		return
	}
	local, _ := lookup(d.cfg, "plugins", CRIv3, "use_local_image_pull").(bool)
	if local {
		d.add("pull path", OK, "CRI pulls with its own client (use_local_image_pull = true), which reads config_path", "")
		return
	}
	d.add("pull path", OK, "CRI pulls through the transfer service, with the hosts of config_path (ctr image pull reads them only with --hosts-dir)", "")
}

// checkHosts reads <config_path>/_default/hosts.toml: cove-node must be its first host,
// with pull and resolve.
func (d *doctor) checkHosts() {
	const name = "hosts.toml"
	if d.configPath == "" || strings.Contains(d.configPath, ":") {
		return
	}
	dir := d.fileOfConf(d.configPath)
	p := filepath.Join(dir, "_default", "hosts.toml")
	cove := "http://" + d.Addr
	fix := "run cove-node install (it merges cove-node's entry into the file and keeps the others)"
	b, err := os.ReadFile(p)
	if err != nil {
		d.add(name, Fail, fmt.Sprintf("%s: %v: containerd pulls straight from each registry", p, err), fix)
		return
	}
	exprs, m, err := ParseHosts(b)
	if err != nil {
		d.add(name, Fail, fmt.Sprintf("%s is not valid TOML (%v): containerd ignores every mirror in it", p, err), "fix the file, then run cove-node install")
		return
	}
	host, _ := lookup(m, "host", cove).(map[string]any)
	first := FirstHost(exprs)
	switch {
	case host == nil:
		d.add(name, Fail, fmt.Sprintf("%s does not list cove-node (%s, from %s): containerd never asks it", p, cove, d.addrFrom), fix)
	case !hasCaps(host, "pull", "resolve"):
		d.add(name, Fail, fmt.Sprintf("%s lists %s without capabilities pull and resolve: containerd skips it", p, cove), fix)
	case first != cove:
		d.add(name, Warn, fmt.Sprintf("%s lists %s, but %s first: containerd tries that one first", p, cove, first),
			"move cove-node's [host] table first (cove-node install puts it there)")
	default:
		d.add(name, OK, fmt.Sprintf("%s makes %s the first mirror of every registry", p, cove), "")
	}
	if ents, err := os.ReadDir(dir); err == nil {
		var hidden []string
		for _, e := range ents {
			if e.IsDir() && e.Name() != "_default" {
				hidden = append(hidden, e.Name())
			}
		}
		if len(hidden) > 0 {
			d.add("registry directories", Warn, fmt.Sprintf("%s has directories of its own for %s: containerd reads them instead of _default, so pulls from those registries bypass cove-node", d.configPath, strings.Join(hidden, ", ")),
				fmt.Sprintf("add the [host.%q] table to their hosts.toml, before their other hosts", cove))
		}
	}
}

// hasCaps says whether a host table's capabilities include all of want (containerd's
// default, when the key is absent, is pull, resolve and push).
func hasCaps(host map[string]any, want ...string) bool {
	caps, ok := host["capabilities"].([]any)
	if !ok {
		return host["capabilities"] == nil
	}
	for _, w := range want {
		found := false
		for _, c := range caps {
			found = found || c == w
		}
		if !found {
			return false
		}
	}
	return true
}
