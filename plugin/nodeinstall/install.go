package nodeinstall

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/cove-oci/cove/plugin/content"
)

// ErrRolledBack wraps a failure after the first change: the run's changes were undone.
var ErrRolledBack = errors.New("rolled back: the files are as they were before this run")

// Result is what an install changed.
type Result struct {
	// Changed is false when the node already was as configured.
	Changed bool
	// RestartContainerd is true when containerd's configuration changed; with NoRestart
	// containerd still has to be restarted to read it.
	RestartContainerd bool
}

// installer is one install run: the staged files, then the transaction that writes them.
type installer struct {
	*Options
	tx         *tx
	ctd        containerd
	ctdVersion string
	version    int64  // the root config's version
	ctdRoot    string // content hook: containerd's root and socket as containerd reads them
	ctdAddress string
}

func (o *Options) say(format string, a ...any) {
	fmt.Fprintf(o.Out, "%s: %s\n", o.Prog, fmt.Sprintf(format, a...))
}

func (o *Options) warn(format string, a ...any) {
	fmt.Fprintf(o.Err, "%s: warning: %s\n", o.Prog, fmt.Sprintf(format, a...))
}

// Install installs or updates cove-node on the node as o says: read and check everything,
// stage every file, then write them in one transaction that a failure rolls back, check the
// result with containerd itself, and (re)start the services unless NoRestart. Options must
// have been validated.
func Install(ctx context.Context, o *Options) (Result, error) {
	in := &installer{Options: o, tx: newTx(o.Roots, o.say)}
	staged, err := in.stage(ctx)
	if err != nil {
		return Result{}, err
	}
	if err := in.apply(staged); err != nil {
		in.tx.rollback()
		return Result{}, fmt.Errorf("%v: %w", err, ErrRolledBack)
	}
	if err := in.verify(ctx); err != nil {
		in.tx.rollback()
		return Result{}, fmt.Errorf("%v: %w", err, ErrRolledBack)
	}
	res := Result{Changed: in.tx.ran(), RestartContainerd: in.tx.changed["rootconfig"] || in.tx.changed["dropin"]}
	if err := in.services(ctx); err != nil {
		return res, err
	}
	switch {
	case !res.Changed:
		o.say("nothing to change: cove-node is installed as configured")
	case o.ContentHook:
		o.say("installed cove-node (content-hook mode) as containerd's mirror http://%s and its content store and differ on %s (%s/io.containerd.content.v1.content); backups in %s; undo with: %s", o.Addr, o.Conf(ContentSocket), in.ctdRoot, BackupDir, o.undo())
	default:
		o.say("installed cove-node (mirror-only mode) as containerd's mirror http://%s; backups in %s; undo with: %s", o.Addr, BackupDir, o.undo())
	}
	o.say("check: cove-node doctor%s; crictl pull IMAGE; curl -s http://%s/metrics | grep cove_node_requests_total (ctr reads hosts.toml only with: ctr image pull --hosts-dir %s IMAGE)", o.rootFlags(), o.Addr, o.Conf(o.HostsDir))
	return res, nil
}

func (o *Options) rootFlags() string {
	switch {
	case o.sandboxed():
		return " --root-dir " + o.RootDir
	case o.hosted():
		return " --host-root " + o.HostRoot
	}
	return ""
}

func (o *Options) undo() string {
	s := "cove-node uninstall" + o.rootFlags()
	if o.NoRestart {
		s += " --no-restart"
	}
	return s
}

// staged holds every file the install writes, as it will be.
type staged struct {
	binary, unit, socket, cacheCA, kubeconfig, hosts, dropin, rootConfig []byte
}

// stage reads and checks everything and builds every file; it changes nothing.
func (in *installer) stage(ctx context.Context) (*staged, error) {
	s := &staged{}
	in.ctd = findContainerd(in.Roots, in.ContainerdBin)
	if in.ctd.bin == "" {
		in.warn("no containerd binary found (--containerd-bin): the result is not checked by containerd itself")
	} else {
		v, err := in.ctd.version(ctx)
		if err != nil {
			return nil, err
		}
		if v == "" {
			in.warn("cannot read a version from %s --version", in.ctd.bin)
		}
		in.ctdVersion = v
	}
	if !in.NoRestart {
		if _, err := exec.LookPath(in.Systemctl[0]); err != nil {
			return nil, fmt.Errorf("%s not found (use --no-restart to install files only)", in.Systemctl[0])
		}
	}
	cfg := in.File(in.ContainerdConfig)
	in.version = 3
	st, err := os.Lstat(cfg)
	switch {
	case err == nil && st.Mode()&fs.ModeSymlink != 0:
		return nil, fmt.Errorf("%s is a symbolic link: pass the file it points to with --containerd-config", cfg)
	case err == nil:
		b, err := os.ReadFile(cfg)
		if err != nil {
			return nil, err
		}
		m, err := decode(b)
		if err != nil {
			return nil, fmt.Errorf("%s is not valid TOML (%v): containerd cannot load it; fix it first", cfg, err)
		}
		if in.ctd.bin != "" {
			if _, err := in.ctd.dump(ctx, in.Conf(in.ContainerdConfig)); err != nil {
				return nil, fmt.Errorf("containerd (%s) cannot load %s as it is: %v", in.ctd.bin, cfg, err)
			}
		}
		v, ok := m["version"].(int64)
		if !ok {
			return nil, fmt.Errorf("%s has no version key, so containerd reads it as version 1, which drop-ins cannot extend: migrate it first (containerd config migrate > new.toml, review, replace)", cfg)
		}
		if v < 2 || v > 4 {
			return nil, fmt.Errorf("%s has version = %d: cove-node install knows versions 2, 3 and 4", cfg, v)
		}
		in.version = v
		if err := in.checkRegistry(); err != nil {
			return nil, err
		}
		if s.rootConfig, _, err = AddImport(b, in.Conf(in.ContainerdConfig), in.Conf(in.dropinPath())); err != nil {
			return nil, fmt.Errorf("%s: cannot add the drop-in to its imports: %v", cfg, err)
		}
		if in.ContentHook {
			if err := in.contentHook(m); err != nil {
				return nil, err
			}
		}
	case errors.Is(err, fs.ErrNotExist):
		s.rootConfig = []byte("# containerd configuration created by cove-node install (there was none): only the\n" +
			"# cove-node drop-in, every other setting is containerd's default. Uninstalling deletes it.\n" +
			"version = 3\nimports = [" + strconv.Quote(in.Conf(in.dropinPath())) + "]\n")
		if in.ContentHook {
			if err := in.contentHook(nil); err != nil {
				return nil, err
			}
		}
	default:
		return nil, err
	}
	s.dropin = []byte(in.dropinFile(in.version))
	if err := checkTOML(s.dropin); err != nil {
		return nil, fmt.Errorf("the drop-in cove-node install made is not valid TOML (%v): a bug, please report it", err)
	}
	if err := in.stageHosts(s); err != nil {
		return nil, err
	}
	if in.CacheCA != "" {
		b, n, err := readCABundle(in.CacheCA)
		if err != nil {
			return nil, err
		}
		s.cacheCA = b
		in.say("--cache-ca: %d CA certificate(s) from %s", n, in.CacheCA)
	}
	if in.KubeTokenFile != "" {
		if s.kubeconfig, err = in.podKubeconfig(); err != nil {
			return nil, err
		}
		in.say("--caches-from-endpointslices %s: cove-node reads the API with %s (token %s)", in.CachesFrom, KubeconfigPath, in.KubeTokenFile)
	}
	if s.binary, err = os.ReadFile(in.Binary); err != nil {
		return nil, fmt.Errorf("--binary '%s': %v", in.Binary, err)
	}
	s.unit = []byte(in.unitFile(in.ctdRoot, in.ctdAddress))
	if in.ContentHook {
		s.socket = []byte(in.socketUnitFile())
	}
	in.warnHiddenHosts()
	return s, nil
}

// checkRegistry walks the root config and what it imports (as containerd does, the
// drop-in excepted) and refuses settings the drop-in would fight: another CRI registry
// config_path, or the deprecated registry.mirrors (containerd refuses it together with
// config_path: internal/cri/config/config.go, ValidateImageConfig).
func (in *installer) checkRegistry() error {
	want := in.Conf(in.HostsDir)
	return configFiles(in.File(in.ContainerdConfig), in.File(in.dropinPath()), in.confOfFile, in.fileOfConf,
		func(f string, m map[string]any) error {
			for _, plugin := range []string{CRIv2, CRIv3} {
				reg, _ := lookup(m, "plugins", plugin, "registry").(map[string]any)
				// "" is unset: containerd config default writes config_path = '' and a
				// later non-empty value wins the merge.
				if p, _ := reg["config_path"].(string); p != "" {
					if p != want {
						return fmt.Errorf("%s already sets CRI's registry config_path (plugins.%q.registry.config_path = %q). cove needs it to be %s, a single directory; change that line (or pass --hosts-dir %s if it is a single hosts directory), then run this again", f, plugin, p, want, p)
					}
					in.say("%s already sets CRI's registry config_path to %s", f, want)
				}
				if mirrors, _ := reg["mirrors"].(map[string]any); len(mirrors) > 0 {
					return fmt.Errorf("%s uses the deprecated CRI registry.mirrors (plugins.%q.registry.mirrors): containerd refuses it together with config_path. Move those mirrors to hosts.toml files under %s and remove registry.mirrors, then run this again", f, plugin, in.HostsDir)
				}
			}
			return nil
		})
}

// contentHook (--content-hook) checks the root config's version and finds containerd's
// root and gRPC socket (m: the root config, nil when there is none).
func (in *installer) contentHook(m map[string]any) error {
	cfg := in.File(in.ContainerdConfig)
	if in.version == 2 {
		return fmt.Errorf("%s has version = 2: the content hook's containerd fragment is version 3 (plugin names and disabled_plugins differ in version 2, and a drop-in cannot be newer than its root config). Migrate the config first (containerd config migrate > new.toml, review, replace; containerd 2.x's default config is version 3 or 4), or install without --content-hook (mirror-only)", cfg)
	}
	in.ctdRoot, in.ctdAddress = in.Conf(ctdDefaultRoot), in.Conf(ctdDefaultSocket)
	// Paths in the config are as containerd reads them: used as they are.
	if v := lookupString(m, "root"); v != "" {
		in.ctdRoot = v
	}
	if v := grpcAddress(m); v != "" {
		in.ctdAddress = v
	}
	for _, f := range []struct{ name, v string }{{"root", in.ctdRoot}, {"grpc.address", in.ctdAddress}} {
		if !strings.HasPrefix(f.v, "/") || !plainPath.MatchString(f.v) || slices.Contains(strings.Split(f.v, "/"), "..") {
			return fmt.Errorf("%s sets %s = %q: the content hook needs an absolute path of plain characters (letters, digits, . _ / + @ -) to pass to cove-node", cfg, f.name, f.v)
		}
	}
	in.ctdRoot = strings.TrimSuffix(filepath.Clean(in.ctdRoot), "/")
	if in.Arch == "" {
		return fmt.Errorf("--content-hook needs the node's architecture")
	}
	return nil
}

// stageHosts merges cove-node's block into _default/hosts.toml.
func (in *installer) stageHosts(s *staged) error {
	hp := in.File(in.hostsTOML())
	b, err := os.ReadFile(hp)
	if errors.Is(err, fs.ErrNotExist) {
		b, err = nil, nil
	}
	if err != nil {
		return fmt.Errorf("%s: %v", hp, err)
	}
	out, warnings, err := MergeHosts(b, in.Addr)
	if err != nil {
		return fmt.Errorf("%s %v", hp, err)
	}
	for _, w := range warnings {
		in.warn("%s: %s", hp, w)
	}
	s.hosts = out
	return nil
}

// warnHiddenHosts: per-registry directories in the hosts directory hide _default for
// their registry (containerd uses the first directory that exists and merges nothing).
func (in *installer) warnHiddenHosts() {
	ents, _ := os.ReadDir(in.File(in.HostsDir))
	for _, e := range ents {
		if !e.IsDir() || e.Name() == "_default" {
			continue
		}
		in.warn("%s/%s/ exists, so containerd reads it instead of _default for registry '%s': pulls from it bypass cove-node. To route them through cove, add the [host.\"http://%s\"] table of %s to %s/%s/hosts.toml before its other [host] tables.",
			in.HostsDir, e.Name(), strings.TrimSuffix(e.Name(), "_"), in.Addr, in.hostsTOML(), in.HostsDir, e.Name())
	}
	if ents, _ := os.ReadDir(in.File("/etc/docker/certs.d")); len(ents) > 0 {
		in.warn("/etc/docker/certs.d has entries; CRI reads only %s once config_path is set: move what it needs there", in.HostsDir)
	}
}

// apply writes the staged files in one transaction.
func (in *installer) apply(s *staged) error {
	t := in.tx
	if err := t.makeDirs(BackupDir); err != nil {
		return err
	}
	// Backups can hold registry credentials (CRI's registry.configs auth).
	if err := os.Chmod(t.File(BackupDir), 0o700); err != nil {
		return err
	}
	if err := t.put("binary", BinPath, s.binary, 0o755); err != nil {
		return err
	}
	if in.ContentHook {
		if err := t.put("socket", SocketUnitPath, s.socket, 0o644); err != nil {
			return err
		}
	} else if err := t.takeOut("socket", SocketUnitPath, "content hook off"); err != nil {
		return err
	}
	if s.cacheCA != nil {
		if err := t.put("cacheca", CacheCAPath, s.cacheCA, 0o644); err != nil {
			return err
		}
	} else if err := t.takeOut("cacheca", CacheCAPath, "no --cache-ca"); err != nil {
		return err
	}
	if s.kubeconfig != nil {
		if err := t.put("kubeconfig", KubeconfigPath, s.kubeconfig, 0o600); err != nil {
			return err
		}
	} else if err := t.takeOut("kubeconfig", KubeconfigPath, "no --kube-token-file"); err != nil {
		return err
	}
	for _, f := range []struct {
		role, path string
		data       []byte
	}{
		{"unit", UnitPath, s.unit},
		{"hosts", in.hostsTOML(), s.hosts},
		{"dropin", in.dropinPath(), s.dropin},
		{"rootconfig", in.ContainerdConfig, s.rootConfig},
	} {
		if err := t.put(f.role, f.path, f.data, 0o644); err != nil {
			return err
		}
	}
	return t.writeHashes()
}

// verify has containerd load the new configuration and checks that it reads what the
// install wrote (an import loaded after the drop-in could override it).
func (in *installer) verify(ctx context.Context) error {
	if in.ctd.bin == "" {
		return nil
	}
	m, err := in.ctd.dump(ctx, in.Conf(in.ContainerdConfig))
	if err != nil {
		return fmt.Errorf("containerd (%s) cannot load the new configuration: %v", in.ctd.bin, err)
	}
	want := in.Conf(in.HostsDir)
	if got := criConfigPath(m); got != want {
		return fmt.Errorf("containerd (%s) reads CRI's registry config_path as '%s', not %s: an import loaded after the drop-in may override it", in.ctd.bin, got, want)
	}
	if !in.ContentHook {
		in.say("checked: containerd %s loads %s with CRI's registry config_path = %s", in.ctdVersion, in.ContainerdConfig, want)
		return nil
	}
	sock := in.Conf(ContentSocket)
	if got := lookupString(m, "proxy_plugins", content.ContentProxyName, "address"); got != sock {
		return fmt.Errorf("containerd (%s) reads [proxy_plugins.cove] address as '%s', not %s: an import loaded after the drop-in may override it", in.ctd.bin, got, sock)
	}
	disabled, _ := m["disabled_plugins"].([]any)
	if !slices.Contains(disabled, any("io.containerd.content.v1.content")) {
		return fmt.Errorf("containerd (%s) does not read io.containerd.content.v1.content in disabled_plugins from the new configuration", in.ctd.bin)
	}
	in.say("checked: containerd %s loads %s with CRI's registry config_path = %s and the content hook on %s", in.ctdVersion, in.ContainerdConfig, want, sock)
	return nil
}
