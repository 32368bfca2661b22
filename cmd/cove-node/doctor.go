package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os/signal"
	"syscall"
	"time"

	"github.com/cove-oci/cove/plugin/nodeinstall"
)

const doctorUsage = `Usage: cove-node doctor [flags]

Checks whether this node's containerd really pulls through cove-node, one line per check
(ok, warn or fail, and what to do): the running containerd's version and whether it was
restarted since its configuration changed, CRI's pull path, the registry config_path
containerd reads (containerd config dump), _default/hosts.toml, and a live probe of
cove-node. Exit status 1 when a check fails: the mirror is unused (pulls go straight to
the registries) or containerd cannot run; 2 on bad usage.

Flags:
`

func doctorCmd(args []string, stdout, stderr io.Writer) int {
	var o nodeinstall.DoctorOptions
	fs := flag.NewFlagSet("cove-node doctor", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	rootFlags(fs, &o.Roots)
	fs.StringVar(&o.ContainerdConfig, "containerd-config", nodeinstall.DefaultConfig, "containerd's root config `PATH`")
	fs.StringVar(&o.ContainerdBin, "containerd-bin", "", "the containerd `PATH` that loads the config (default: as cove-node install finds it)")
	fs.StringVar(&o.ContainerdAddress, "containerd-address", "", "the running containerd's gRPC `SOCKET` (default: the config's grpc.address, else /run/containerd/containerd.sock)")
	fs.StringVar(&o.Addr, "addr", "", "cove-node's `HOST:PORT` (default: the installed unit's --addr, else 127.0.0.1:5006)")
	fs.DurationVar(&o.Timeout, "timeout", 2*time.Second, "bound on each live probe")
	if err := parseFlags(fs, args, stderr, doctorUsage); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "cove-node doctor: %v\n", err)
		return 2
	}
	if o.RootDir != "" && o.HostRoot != "" {
		fmt.Fprintln(stderr, "cove-node doctor: --root-dir and --host-root: give one")
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	checks := nodeinstall.Doctor(ctx, o)
	nodeinstall.Report(stdout, checks)
	if nodeinstall.Failed(checks) {
		return 1
	}
	return 0
}
