package peers

import (
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// noDrain starts every cove-cache under test without the drain's grace (--shutdown-grace,
// 25 s by default, longer than Stop waits before SIGKILL): a test that exercises the drain
// passes its own --shutdown-grace, which, coming later on the command line, wins.
const noDrain = "--shutdown-grace=0"

// Signal sends sig to the cove-cache process alone (not its group), as the kubelet does.
func (c *Cove) Signal(sig syscall.Signal) error {
	return syscall.Kill(c.proc.cmd.Process.Pid, sig)
}

// WaitExit waits up to timeout for cove-cache to end on its own and returns its exit
// status; an error when it is still running then or died of a signal.
func (c *Cove) WaitExit(timeout time.Duration) (int, error) {
	select {
	case <-c.proc.done:
	case <-time.After(timeout):
		return -1, fmt.Errorf("cove-cache still running after %s", timeout)
	}
	var ee *exec.ExitError
	if err := c.proc.waitErr; errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return -1, fmt.Errorf("cove-cache killed by %s", ws.Signal())
		}
		return ee.ExitCode(), nil
	} else if err != nil {
		return -1, err
	}
	return 0, nil
}

// StartAgain starts cove-cache again after it exited, on the same address, storage
// directory and flags: a replaced pod behind an address clients keep using (a Service).
func (c *Cove) StartAgain(t testing.TB) {
	t.Helper()
	if done, _ := c.proc.exited(); !done {
		t.Fatal("peers: StartAgain: cove-cache is still running")
	}
	c.restarts++
	logPath := filepath.Join(filepath.Dir(c.LogPath), fmt.Sprintf("cove-cache-again-%d.log", c.restarts))
	args := append([]string{"serve", "--addr", c.Addr, "--storage-dir", c.StorageDir, noDrain}, c.args...)
	p, err := startProc("cove-cache", CoveBinary(t, "cove-cache"), args, cleanEnv(), logPath, logPath, 10*time.Second)
	if err != nil {
		t.Fatalf("peers: start cove-cache: %v", err)
	}
	if err := waitReady(p, readyClient, c.URL+"/readyz", 10*time.Second, false); err != nil {
		p.stop()
		t.Fatalf("peers: cove-cache did not become ready again on %s: %v\n%s", c.Addr, err, logTail(logPath, 30))
	}
	c.proc, c.LogPath = p, logPath
}
