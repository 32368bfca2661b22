package filesystem

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// LockFile is the file in the storage directory that a running store holds an exclusive
// flock(2) on, from New until Close or the end of the process (the kernel drops the lock
// when the process dies, kill -9 included). It holds the holder's pid, for the error a
// second process gets.
const LockFile = "cove.lock"

// LockedError is New's answer when another process (or another Driver of this one) has
// the directory: opening it would discard that store's writes in progress.
type LockedError struct {
	Dir string // the storage directory
	PID int    // the holder's pid as it recorded it (in its own PID namespace); 0 if unknown
}

func (e *LockedError) Error() string {
	holder := "another process"
	if e.PID > 0 {
		holder = "another process (pid " + strconv.Itoa(e.PID) + ")"
	}
	return fmt.Sprintf("storage directory %s is in use by %s, which holds %s locked: one directory serves one cove-cache at a time",
		e.Dir, holder, filepath.Join(e.Dir, LockFile))
}

// lockDir takes the exclusive lock on dir's lock file without waiting, and records this
// process's pid in it.
func lockDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, LockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open lock file: %w", err)
	}
	// Go opens files close-on-exec: a child process never inherits the lock.
	if err := flock(f); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, &LockedError{Dir: dir, PID: readPID(path)}
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}

func flock(f *os.File) error {
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err != syscall.EINTR {
			return err
		}
	}
}

// readPID reads the pid the holder wrote (0 when it has not yet, or the file is odd).
func readPID(path string) int {
	b, err := os.ReadFile(path)
	if err != nil || len(b) > 32 {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}
