package main

import (
	"errors"
	"flag"
	"fmt"
	"slices"

	"github.com/cove-oci/cove/internal/cli"
	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/server"
)

// peerOptions are the scale-out flags: the replicas of one cache on one bucket
// (docs/scaleout.md).
type peerOptions struct {
	peers      cli.Repeated
	advertise  string
	secretFile string
}

func (o *peerOptions) register(fs *flag.FlagSet) {
	fs.Var(&o.peers, "peer", "a replica of this cache, as the others reach it: `URL` http(s)://HOST:PORT (repeatable: the full list, this replica included); needs --advertise-url, --peer-secret-file and --s3-endpoint")
	fs.StringVar(&o.advertise, "advertise-url", "", "with --peer: this replica's own `URL`, as listed in --peer")
	fs.StringVar(&o.secretFile, "peer-secret-file", "", "with --peer: the `FILE` holding the secret every replica proves its peer requests with (at least 16 bytes; in Kubernetes a mounted Secret)")
}

// validate checks the flags; with none of them given there is no cluster.
func (o *peerOptions) validate(s3 bool, bounded bool) error {
	if len(o.peers) == 0 {
		if o.advertise != "" || o.secretFile != "" {
			return errors.New("--advertise-url and --peer-secret-file need --peer")
		}
		return nil
	}
	if o.advertise == "" || o.secretFile == "" {
		return errors.New("--peer needs --advertise-url and --peer-secret-file")
	}
	if !s3 {
		return errors.New("--peer needs --s3-endpoint: replicas share one store, and a filesystem store is one process's")
	}
	if bounded {
		// Each replica would evict by its own view of use: blobs another replica serves
		// could go. Eviction shared by replicas is not built yet.
		return errors.New("--peer with --storage-max-size is not supported yet: replicas do not share an eviction index")
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
func (o *peerOptions) clusterConfig() (*server.ClusterConfig, error) {
	if len(o.peers) == 0 {
		return nil, nil
	}
	secret, err := cluster.ReadSecretFile(o.secretFile)
	if err != nil {
		return nil, fmt.Errorf("--peer-secret-file: %w", err)
	}
	static, err := cluster.NewStatic(o.peers)
	if err != nil {
		return nil, err
	}
	self, _ := cluster.ParseMember(o.advertise)
	return &server.ClusterConfig{Membership: static, Self: self, Secret: secret}, nil
}
