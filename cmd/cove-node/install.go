package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os/signal"
	"runtime"
	"strings"
	"syscall"

	"github.com/cove-oci/cove/internal/cli"
	"github.com/cove-oci/cove/plugin/nodeinstall"
)

const installUsage = `Usage:
  cove-node install [flags] --cache URL [--cache URL]...   install or update cove-node on this node
  cove-node uninstall [--root-dir DIR | --host-root DIR] [--no-restart] [--systemctl CMD]

install makes cove-node containerd's _default registry mirror: the systemd unit, the
_default hosts.toml (merged: other entries stay), a containerd drop-in setting CRI's
registry config_path, and the drop-in in the root config's imports. Every file is backed
up before its first change; a second run changes nothing; uninstall puts every file back
byte for byte. containerd checks the result (containerd config dump). See docs/node.md.

Exit status: 0 done, 1 refused or failed (nothing changed), 2 bad usage (nothing changed).

Flags:
`

// rootFlags are the flags install, uninstall and doctor share: where the node's files are.
func rootFlags(fs *flag.FlagSet, r *nodeinstall.Roots) {
	fs.StringVar(&r.RootDir, "root-dir", "", "treat `DIR` as / : files under it, and every path written into a config carries it too (a sandbox that runs containerd for real); needs --no-restart")
	fs.StringVar(&r.HostRoot, "host-root", "", "the node's / is mounted at `DIR` (a DaemonSet's hostPath): files under it, configs name them as the node sees them")
}

// systemctlFlag parses --systemctl into a command line.
type systemctlFlag []string

func (s *systemctlFlag) String() string { return strings.Join(*s, " ") }
func (s *systemctlFlag) Set(v string) error {
	*s = strings.Fields(v)
	if len(*s) == 0 {
		return errors.New("empty command")
	}
	return nil
}

func parseInstall(args []string, stderr io.Writer) (*nodeinstall.Options, error) {
	o := &nodeinstall.Options{Prog: "cove-node install", Arch: runtime.GOARCH}
	fs := flag.NewFlagSet("cove-node install", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	rootFlags(fs, &o.Roots)
	var caches, plain cli.Repeated
	var sysctl systemctlFlag
	fs.BoolVar(&o.NoRestart, "no-restart", false, "touch no service: say what to run instead (containerd must then be restarted to read its new configuration)")
	fs.Var(&sysctl, "systemctl", "the `COMMAND` that runs the node's systemctl (default systemctl; from a pod with --host-root, for example \"nsenter --target 1 --mount --pid -- systemctl\")")
	fs.BoolVar(&o.ContentHook, "content-hook", false, "also make cove-node containerd's content store and differ (proxy plugins on cove-node.socket); needs a version 3 or 4 containerd config")
	fs.StringVar(&o.Binary, "binary", "", "the cove-node `PATH` to install (default: this program)")
	fs.Var(&caches, "cache", "a cove-cache base `URL`, http(s)://HOST[:PORT] (repeatable, tried in order; at least one)")
	fs.StringVar(&o.CacheCA, "cache-ca", "", "PEM bundle `FILE` of the CA certificates that verify https:// --cache URLs")
	fs.StringVar(&o.CachesFrom, "caches-from-endpointslices", "", "cove-node reads the cove-cache replicas from this Kubernetes Service's ready EndpointSlices, `NAMESPACE/SERVICE` (see cove-node serve -h); needs --kubeconfig or --kube-token-file")
	fs.StringVar(&o.CachesPortName, "caches-port-name", "", "with --caches-from-endpointslices: the Service port `NAME` (default http)")
	fs.StringVar(&o.Kubeconfig, "kubeconfig", "", "with --caches-from-endpointslices: a kubeconfig `PATH` on the node that cove-node reads the API with")
	fs.StringVar(&o.KubeTokenFile, "kube-token-file", "", "with --caches-from-endpointslices, in a pod: the node `PATH` of a ServiceAccount token the kubelet keeps current; the install writes "+nodeinstall.KubeconfigPath+" with it, the API server from KUBERNETES_SERVICE_HOST/PORT and its CA from --kube-ca-file")
	fs.StringVar(&o.KubeCAFile, "kube-ca-file", nodeinstall.DefaultKubeCAFile, "with --kube-token-file: the API server's CA `FILE` in this pod")
	fs.StringVar(&o.Addr, "addr", nodeinstall.DefaultAddr, "cove-node's loopback `HOST:PORT`, containerd's mirror")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", "", "cove-node also serves /metrics, and nothing else, on `HOST:PORT` (cove-node serve --metrics-addr): an address of this node Prometheus can reach, such as NODE_IP:5007; empty: /metrics on --addr only")
	fs.Var(&plain, "origin-plain-http", "cove-node reaches this origin `HOST:PORT` over plain HTTP when it falls back (repeatable)")
	fs.StringVar(&o.HostsDir, "hosts-dir", nodeinstall.DefaultHostsDir, "containerd's registry hosts `DIR`")
	fs.StringVar(&o.ContainerdConfig, "containerd-config", nodeinstall.DefaultConfig, "containerd's root config `PATH`")
	fs.StringVar(&o.ContainerdBin, "containerd-bin", "", "the containerd `PATH` that checks the result (default: containerd on PATH, /usr/local/bin, /usr/bin; the node's under --host-root)")
	cacheCASet := false
	if err := parseFlags(fs, args, stderr, installUsage); err != nil {
		return nil, err
	}
	fs.Visit(func(f *flag.Flag) { cacheCASet = cacheCASet || f.Name == "cache-ca" })
	if cacheCASet && o.CacheCA == "" {
		return nil, errors.New("--cache-ca needs a file")
	}
	o.Caches, o.PlainHTTP, o.Systemctl = caches, plain, sysctl
	o.Err = stderr
	return o, o.Validate()
}

// parseFlags parses args with fs, printing usage for -h and naming a bad flag as the user
// typed it.
func parseFlags(fs *flag.FlagSet, args []string, stderr io.Writer, usage string) error {
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stderr, usage)
		fs.SetOutput(stderr)
		fs.PrintDefaults()
		return err
	}
	if err != nil {
		msg := err.Error()
		if name, ok := strings.CutPrefix(msg, "flag provided but not defined: "); ok {
			return fmt.Errorf("unknown argument '-%s'", name)
		}
		if name, ok := strings.CutPrefix(msg, "flag needs an argument: "); ok {
			return fmt.Errorf("%s needs a value", name)
		}
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unknown argument '%s'", fs.Arg(0))
	}
	return nil
}

func parseUninstall(args []string, stderr io.Writer) (*nodeinstall.UninstallOptions, error) {
	u := &nodeinstall.UninstallOptions{Prog: "cove-node uninstall", Err: stderr}
	fs := flag.NewFlagSet("cove-node uninstall", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	rootFlags(fs, &u.Roots)
	var sysctl systemctlFlag
	fs.BoolVar(&u.NoRestart, "no-restart", false, "touch no service: say what to run instead")
	fs.Var(&sysctl, "systemctl", "the `COMMAND` that runs the node's systemctl")
	if err := fs.Parse(args); err != nil || fs.NArg() > 0 {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stderr, installUsage)
			fs.SetOutput(stderr)
			fs.PrintDefaults()
			return nil, err
		}
		return nil, errors.New("uninstall takes only --root-dir or --host-root, --no-restart and --systemctl (the install recorded the rest)")
	}
	u.Systemctl = sysctl
	return u, nil
}

// installCmd runs cove-node install.
func installCmd(args []string, stdout, stderr io.Writer) int {
	const prog = "cove-node install"
	o, err := parseInstall(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		return usageFailure(stderr, prog, err)
	}
	o.Out = stdout
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	if _, err := nodeinstall.Install(ctx, o); err != nil {
		return failure(stderr, prog, err)
	}
	return 0
}

// uninstallCmd runs cove-node uninstall.
func uninstallCmd(args []string, stdout, stderr io.Writer) int {
	const prog = "cove-node uninstall"
	u, err := parseUninstall(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		return usageFailure(stderr, prog, err)
	}
	u.Out = stdout
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	if err := nodeinstall.Uninstall(ctx, u); err != nil {
		return failure(stderr, prog, err)
	}
	return 0
}

func usageFailure(stderr io.Writer, prog string, err error) int {
	fmt.Fprintf(stderr, "%s: %v\nRun %s -h for usage. Nothing was changed.\n", prog, err, prog)
	return 2
}

// failure reports err: a usage error (exit 2), or a refusal or failure (exit 1) with what
// became of the files.
func failure(stderr io.Writer, prog string, err error) int {
	var ue *nodeinstall.UsageError
	if errors.As(err, &ue) {
		return usageFailure(stderr, prog, err)
	}
	fmt.Fprintf(stderr, "%s: error: %v\n", prog, err)
	switch {
	case errors.Is(err, nodeinstall.ErrRolledBack), errors.Is(err, nodeinstall.ErrIncomplete):
	default:
		fmt.Fprintf(stderr, "%s: nothing was changed.\n", prog)
	}
	return 1
}
