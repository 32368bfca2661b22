// Package bench holds cove-cache's benchmarks (bench_test.go): real containerd, real
// distribution registries and the real cove-cache binary on loopback, each figure
// printed as a ratio against an anchor measured side by side in the same run.
//
// Run them with `make bench`; docs/benchmarks.md explains each one and records results.
package bench
