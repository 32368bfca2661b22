package main

import (
	"flag"
	"fmt"

	"github.com/cove-oci/cove/proxy/evict"
)

// fillOptions are the flags of cold fills fetched in parallel ranges (proxy/fill).
//
// Defaults: 4 ranges of 16 MiB at once for blobs of 64 MiB or more. One TCP stream from
// an origin across a WAN is bounded by its window over the round trip, and CDNs in
// front of registries cap each connection: four streams bring most of what a link can
// carry without looking like a flood to the origin (browsers and download managers use
// 4 to 8). 16 MiB makes a request's cost (a round trip, often a redirect to storage)
// small against its bytes, and keeps what a dropped connection loses, and what a range
// ahead fetches for a lazy puller, small. Below 64 MiB (most image layers) a blob is a
// few ranges' worth, which parallel requests would hardly speed up: it keeps its one
// request, and a full cache layer keeps its sendfile path.
type fillOptions struct {
	parallel               int
	rangeSize, parallelMin string

	rangeBytes, minBytes int64
}

// maxFillParallel bounds --fill-parallel: more streams than this are no faster, and an
// origin may take them for abuse.
const maxFillParallel = 32

func (o *fillOptions) register(fs *flag.FlagSet) {
	fs.IntVar(&o.parallel, "fill-parallel", 4, "fetch a cold blob of at least --fill-parallel-min from the origin in `N` ranges at once (1: one stream per blob)")
	fs.StringVar(&o.rangeSize, "fill-range-size", "16MiB", "bytes of one range of a parallel fill, `SIZE` in binary units (at least 64KiB)")
	fs.StringVar(&o.parallelMin, "fill-parallel-min", "64MiB", "smallest blob fetched in parallel ranges, `SIZE` in binary units; smaller ones are fetched in one request")
}

func (o *fillOptions) validate() error {
	if o.parallel < 1 || o.parallel > maxFillParallel {
		return fmt.Errorf("--fill-parallel %d: want 1 to %d", o.parallel, maxFillParallel)
	}
	n, err := evict.ParseSize(o.rangeSize)
	if err != nil {
		return fmt.Errorf("--fill-range-size: %v", err)
	}
	if n < 64<<10 {
		return fmt.Errorf("--fill-range-size %s: want at least 64KiB", o.rangeSize)
	}
	o.rangeBytes = n
	if o.minBytes, err = evict.ParseSize(o.parallelMin); err != nil {
		return fmt.Errorf("--fill-parallel-min: %v", err)
	}
	return nil
}
