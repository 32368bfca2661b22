package peers

import (
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// MountThinExt4 mounts an ext4 filesystem of size bytes whose blocks live in an image
// file on a tmpfs of only backing bytes: a thinly provisioned disk. The filesystem shows
// size bytes free and takes writes into the page cache, but once the backing tmpfs is
// full the device fails the writes back, and fsync(2) returns the error (ENOSPC: the
// kernel passes the loop device's no-space status up). It is unmounted, and its loop
// device detached, when the test ends.
func MountThinExt4(t testing.TB, size, backing int64) *ThinDisk {
	t.Helper()
	under := MountTmpfs(t, "size="+strconv.FormatInt(backing, 10))
	base := t.TempDir()
	img, dir := filepath.Join(under, "fs.img"), filepath.Join(base, "mnt")
	for _, cmd := range [][]string{
		{"truncate", "-s", strconv.FormatInt(size, 10), img},
		// No journal: its blocks would take the little backing room there is.
		{"mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", img},
		{"mkdir", dir},
	} {
		if out, err := exec.Command(cmd[0], cmd[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v: %s", cmd, err, out)
		}
	}
	if out, err := exec.Command("mount", "-o", "loop", img, dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a loop ext4 filesystem here (%v: %s): this test needs root and loop devices", err, out)
	}
	// Registered after MountTmpfs's cleanup, so it runs first: the filesystem goes before
	// the tmpfs that holds its image.
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Logf("unmount %s: %v; detaching it", dir, err)
			_ = syscall.Unmount(dir, syscall.MNT_DETACH)
		}
	})
	return &ThinDisk{Dir: dir, backing: under}
}

// ThinDisk is a thinly provisioned ext4 filesystem mounted at Dir (MountThinExt4).
type ThinDisk struct {
	Dir     string
	backing string
}

// Grow gives the disk backing bytes of room for its blocks, as an operator extending a
// thin pool would.
func (d *ThinDisk) Grow(t testing.TB, backing int64) {
	RemountTmpfs(t, d.backing, 0, "size="+strconv.FormatInt(backing, 10))
}
