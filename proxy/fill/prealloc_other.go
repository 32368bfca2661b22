//go:build !linux

package fill

import "os"

// preallocate does nothing where fallocate(2) is not available.
func preallocate(*os.File, int64) {}
