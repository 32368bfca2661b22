package filesystem

import (
	"errors"
	"testing"
)

// A scratch directory locked by LockDir is refused to a store and to a second LockDir,
// and opens again once released.
func TestLockDirExcludes(t *testing.T) {
	dir := t.TempDir()
	lock, err := LockDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var locked *LockedError
	if _, err := LockDir(dir); !errors.As(err, &locked) {
		t.Fatalf("second LockDir: %v, want a *LockedError", err)
	}
	if _, err := New(dir); !errors.As(err, &locked) {
		t.Fatalf("New on a locked scratch directory: %v, want a *LockedError", err)
	}
	if err := lock.Close(); err != nil {
		t.Fatal(err)
	}
	d, err := New(dir)
	if err != nil {
		t.Fatalf("New after release: %v", err)
	}
	d.Close()
}
