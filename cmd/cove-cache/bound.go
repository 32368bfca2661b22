package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"

	"github.com/cove-oci/cove/internal/cli"
	"github.com/cove-oci/cove/proxy/evict"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/storage"
)

// boundOptions are the flags that bound the store (package evict).
type boundOptions struct {
	maxSize, minFree string
	pins             cli.Repeated

	maxBytes int64
	free     evict.MinFree
}

func (o *boundOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&o.maxSize, "storage-max-size", "", "bound what the store holds (blobs, their records, fills in flight) to `SIZE` in binary units (500GiB, 100MiB); past 90 % the least recently used blobs are evicted down to 80 %; empty: unbounded")
	fs.StringVar(&o.minFree, "storage-min-free", "", "with filesystem storage: also evict while the filesystem has less than `SIZE` (20GiB) or PERCENT (10%) free")
	fs.Var(&o.pins, "pin", "never evict the image a `PATTERN` resolves to (registry/repository:tag, globs allowed: docker.io/library/*:1.*; no :tag = every tag), its manifests and blobs (repeatable); followed as the tag moves")
}

func (o *boundOptions) validate(s3 bool) error {
	if o.maxSize != "" {
		n, err := evict.ParseSize(o.maxSize)
		if err != nil {
			return fmt.Errorf("--storage-max-size: %v", err)
		}
		if n == 0 {
			return errors.New("--storage-max-size must be positive (leave it out for no bound)")
		}
		o.maxBytes = n
	}
	if o.minFree != "" {
		if s3 {
			return errors.New("--storage-min-free watches a filesystem store: with --s3-endpoint bound the store with --storage-max-size")
		}
		m, err := evict.ParseMinFree(o.minFree)
		if err != nil {
			return fmt.Errorf("--storage-min-free: %v", err)
		}
		o.free = m
	}
	for _, p := range o.pins {
		if err := evict.ValidatePin(p); err != nil {
			return fmt.Errorf("--pin: %v", err)
		}
	}
	return nil
}

// wrap bounds store; freeDir is the filesystem directory --storage-min-free watches
// (empty for S3); shared is set for a replica of a cluster (--peer).
func (o *boundOptions) wrap(store storage.Driver, freeDir string, shared *evict.Shared, m *metrics.Store, log *slog.Logger) (*evict.Store, error) {
	cfg := evict.Config{MaxSize: o.maxBytes, MinFree: o.free, Pins: o.pins, Shared: shared, Metrics: m, Logger: log}
	if freeDir != "" {
		cfg.Free = evict.FilesystemFree(freeDir)
	}
	return evict.New(store, cfg)
}
