package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/cove-oci/cove/internal/cli"
	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/evict"
	"github.com/cove-oci/cove/proxy/server"
)

// peerOptions are the scale-out flags: the replicas of one cache on one bucket
// (docs/scaleout.md).
type peerOptions struct {
	peers      cli.Repeated
	fromSlices string // NAMESPACE/SERVICE
	portName   string
	kubeconfig string
	advertise  string
	secretFile string
	syncEvery  time.Duration
}

func (o *peerOptions) register(fs *flag.FlagSet) {
	fs.Var(&o.peers, "peer", "a replica of this cache, as the others reach it: `URL` http(s)://HOST:PORT (repeatable: the full list, this replica included); needs --advertise-url, --peer-secret-file and --s3-endpoint")
	fs.StringVar(&o.fromSlices, "peers-from-endpointslices", "", "the replicas are the ready endpoints of this Kubernetes Service, `NAMESPACE/SERVICE`, watched through its EndpointSlices (needs get, list and watch on endpointslices in NAMESPACE); instead of --peer, with the same other flags")
	fs.StringVar(&o.portName, "peers-port-name", "http", "with --peers-from-endpointslices: the `NAME` of the Service port replicas reach each other at")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "with --peers-from-endpointslices: a kubeconfig `FILE` (default: the pod's in-cluster ServiceAccount)")
	fs.StringVar(&o.advertise, "advertise-url", "", "with --peer or --peers-from-endpointslices: this replica's own `URL`, as the others reach it")
	fs.DurationVar(&o.syncEvery, "peer-sync-interval", 10*time.Second, "with --peer or --peers-from-endpointslices: how often each replica writes its eviction record to the bucket and reads the others' (a replica silent for 6 intervals is no longer waited for; docs/scaleout.md)")
	fs.StringVar(&o.secretFile, "peer-secret-file", "", "with --peer or --peers-from-endpointslices: the `FILE` holding the secret every replica proves its peer requests with (at least 16 bytes; in Kubernetes a mounted Secret)")
}

// validate checks the flags; with none of them given there is no cluster.
func (o *peerOptions) validate(s3 bool) error {
	if len(o.peers) > 0 && o.fromSlices != "" {
		return errors.New("--peer and --peers-from-endpointslices exclude each other: the members come from one of them")
	}
	flag := "--peer"
	if o.fromSlices != "" {
		flag = "--peers-from-endpointslices"
	} else if o.kubeconfig != "" {
		return errors.New("--kubeconfig needs --peers-from-endpointslices")
	}
	if len(o.peers) == 0 && o.fromSlices == "" {
		if o.advertise != "" || o.secretFile != "" {
			return errors.New("--advertise-url and --peer-secret-file need --peer or --peers-from-endpointslices")
		}
		return nil
	}
	if o.advertise == "" || o.secretFile == "" {
		return fmt.Errorf("%s needs --advertise-url and --peer-secret-file", flag)
	}
	if !s3 {
		return fmt.Errorf("%s needs --s3-endpoint: replicas share one store, and a filesystem store is one process's", flag)
	}
	if o.syncEvery <= 0 {
		return errors.New("--peer-sync-interval must be positive")
	}
	if o.fromSlices != "" {
		if _, _, err := o.service(); err != nil {
			return err
		}
		if _, err := cluster.ParseMember(o.advertise); err != nil {
			return fmt.Errorf("--advertise-url: %v", err)
		}
		return nil
	}
	static, err := cluster.NewStatic(o.peers)
	if err != nil {
		return fmt.Errorf("--peer: %v", err)
	}
	self, err := cluster.ParseMember(o.advertise)
	if err != nil {
		return fmt.Errorf("--advertise-url: %v", err)
	}
	if !slices.Contains(static.Members(), self) {
		return fmt.Errorf("--advertise-url %s is not among the --peer URLs %v", self, static.Members())
	}
	return nil
}

// clusterConfig builds the server's cluster configuration, reading the secret; nil
// without --peer.
func (o *peerOptions) clusterConfig(log *slog.Logger) (*server.ClusterConfig, error) {
	if len(o.peers) == 0 && o.fromSlices == "" {
		return nil, nil
	}
	secret, err := cluster.ReadSecretFile(o.secretFile)
	if err != nil {
		return nil, fmt.Errorf("--peer-secret-file: %w", err)
	}
	self, _ := cluster.ParseMember(o.advertise)
	var members cluster.Membership
	if o.fromSlices != "" {
		members, err = o.endpointSlices(self, log)
	} else {
		members, err = cluster.NewStatic(o.peers)
	}
	if err != nil {
		return nil, err
	}
	return &server.ClusterConfig{Membership: members, Self: self, Secret: secret}, nil
}

// sharedEviction is the bounded store's part in the cluster: the replicas evict
// together through records in the bucket (package evict, docs/scaleout.md); nil without
// a cluster.
func (o *peerOptions) sharedEviction(c *server.ClusterConfig) *evict.Shared {
	if c == nil {
		return nil
	}
	return &evict.Shared{Self: c.Self, Members: c.Membership.Members, SyncInterval: o.syncEvery}
}

// service splits --peers-from-endpointslices.
func (o *peerOptions) service() (namespace, name string, err error) {
	namespace, name, ok := strings.Cut(o.fromSlices, "/")
	if !ok || namespace == "" || name == "" || strings.Contains(name, "/") {
		return "", "", fmt.Errorf("--peers-from-endpointslices %q: want NAMESPACE/SERVICE", o.fromSlices)
	}
	return namespace, name, nil
}

// endpointSlices is the membership of the Service's ready endpoints, read with the pod's
// ServiceAccount or --kubeconfig. Member URLs take the scheme of --advertise-url.
func (o *peerOptions) endpointSlices(self string, log *slog.Logger) (cluster.Membership, error) {
	namespace, name, err := o.service()
	if err != nil {
		return nil, err
	}
	client, err := cluster.KubeClient(o.kubeconfig, "cove-cache")
	if err != nil {
		return nil, fmt.Errorf("--peers-from-endpointslices: Kubernetes API configuration: %w", err)
	}
	scheme, _, _ := strings.Cut(self, "://")
	return cluster.EndpointSlices(client, namespace, name,
		cluster.WithPortName(o.portName), cluster.WithScheme(scheme), cluster.WithLogger(log))
}
