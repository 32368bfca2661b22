// Package version holds the build's version, set by the Makefile with -ldflags.
package version

// Version is overwritten at link time: -X github.com/cove-oci/cove/internal/version.Version=...
var Version = "dev"
