package filesystem

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// LockDir creates dir if needed and takes the same lock New takes (LockFile), for a
// directory that holds only scratch files: the spool of a cove-cache whose store is
// elsewhere (S3). A second process on the directory gets a *LockedError instead of
// discarding the first one's files in progress. Close the returned lock to release it;
// the kernel releases it when the process ends.
func LockDir(dir string) (io.Closer, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(abs, 0o750); err != nil {
		return nil, fmt.Errorf("create directory: %w", err)
	}
	return lockDir(abs)
}
