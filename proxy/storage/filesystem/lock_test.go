package filesystem

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// A second store on a directory in use is refused, naming the directory and the holder's
// pid, and touches nothing: the first one's write in progress survives. Once the first
// is closed (its process gone), the directory opens again.
func TestSecondOpenRefused(t *testing.T) {
	root := t.TempDir()
	first, err := New(root)
	if err != nil {
		t.Fatal(err)
	}
	inFlight := filepath.Join(root, "tmp", "put-in-flight")
	if err := os.WriteFile(inFlight, []byte("half a blob"), 0o600); err != nil {
		t.Fatal(err)
	}

	second, err := New(root)
	var locked *LockedError
	if !errors.As(err, &locked) {
		t.Fatalf("second New on a locked directory: %v, %v; want a *LockedError", second, err)
	}
	abs, _ := filepath.Abs(root)
	if locked.Dir != abs || locked.PID != os.Getpid() {
		t.Fatalf("LockedError{Dir: %q, PID: %d}, want %q and this process, %d", locked.Dir, locked.PID, abs, os.Getpid())
	}
	if msg := err.Error(); !strings.Contains(msg, abs) || !strings.Contains(msg, "pid "+strconv.Itoa(os.Getpid())) {
		t.Fatalf("error %q names neither the directory nor the pid", msg)
	}
	if _, err := os.Stat(inFlight); err != nil {
		t.Fatalf("the refused second store removed the first one's write in progress: %v", err)
	}

	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	again, err := New(root)
	if err != nil {
		t.Fatalf("New after the holder closed: %v", err)
	}
	defer again.Close()
	if _, err := os.Stat(inFlight); !os.IsNotExist(err) {
		t.Fatalf("leftover survived the next start: %v", err)
	}
}

// A lock file without a usable pid (the holder has not written it yet, or an old file)
// still refuses, without a pid.
func TestLockedWithoutPID(t *testing.T) {
	root := t.TempDir()
	first, err := New(root)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if err := os.WriteFile(filepath.Join(root, LockFile), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = New(root)
	var locked *LockedError
	if !errors.As(err, &locked) || locked.PID != 0 || strings.Contains(err.Error(), "pid") {
		t.Fatalf("New: %v", err)
	}
}
