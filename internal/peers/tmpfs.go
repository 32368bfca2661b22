package peers

import (
	"errors"
	"syscall"
	"testing"
)

// MountTmpfs mounts a tmpfs with opts (mount options, e.g. "size=40m") on a temporary
// directory and unmounts it at cleanup, even when the test fails; cleanups registered
// later (a process using it) run before. It skips the test when this process may not
// mount (the full-disk tests need root or CAP_SYS_ADMIN).
func MountTmpfs(t testing.TB, opts string) string {
	t.Helper()
	dir, err := TryMountTmpfs(t, opts)
	if err != nil {
		if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) {
			t.Skipf("cannot mount a tmpfs here (%v): the full-disk tests need root or CAP_SYS_ADMIN", err)
		}
		t.Fatalf("mount tmpfs: %v", err)
	}
	return dir
}

// TryMountTmpfs is MountTmpfs for a test that can do without a tmpfs: it returns the
// mount error instead of skipping or failing.
func TryMountTmpfs(t testing.TB, opts string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, opts); err != nil {
		return "", err
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Logf("unmount %s: %v; detaching it", dir, err)
			_ = syscall.Unmount(dir, syscall.MNT_DETACH)
		}
	})
	return dir, nil
}

// RemountTmpfs changes a tmpfs MountTmpfs mounted: flags (syscall.MS_RDONLY, or 0 for
// read-write) and opts (e.g. "size=256m" to give a full store room again).
func RemountTmpfs(t testing.TB, dir string, flags uintptr, opts string) {
	t.Helper()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", syscall.MS_REMOUNT|flags, opts); err != nil {
		t.Fatalf("remount %s (%s): %v", dir, opts, err)
	}
}
