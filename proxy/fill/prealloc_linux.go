package fill

import (
	"os"
	"syscall"
)

// preallocate allocates size bytes of disk for file without changing its size
// (FALLOC_FL_KEEP_SIZE), ignoring failure.
func preallocate(file *os.File, size int64) {
	const keepSize = 0x1 // FALLOC_FL_KEEP_SIZE
	_ = syscall.Fallocate(int(file.Fd()), keepSize, 0, size)
}
