package peers

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// StartCoveNodeActivated runs a cove-node command line given in full, binary first (the
// ExecStart of an installed unit), the way systemd starts a socket-activated service:
// ListenActivated plays the socket unit, StartCoveNodeOn the service. At cleanup (or
// Stop) cove-node is stopped, then the listener is closed, which removes the socket
// file like the unit's RemoveOnStop=yes.
func StartCoveNodeActivated(t testing.TB, argv []string, socketPath string) *CoveNode {
	t.Helper()
	ln := ListenActivated(t, socketPath)
	n := StartCoveNodeOn(t, ln, argv)
	t.Cleanup(func() { n.Stop(); ln.Close() }) // runs before ListenActivated's close
	return n
}

// ListenActivated does what a systemd socket unit does: it listens on the unix socket
// socketPath itself (making its directory, mode 0755, and giving the socket mode 0660,
// as the unit's DirectoryMode and SocketMode say). The listener outlives any cove-node
// started on it, so a test can restart cove-node on the same socket; it is closed at
// cleanup.
func ListenActivated(t testing.TB, socketPath string) *net.UnixListener {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(socketPath), 0o755); err != nil {
		t.Fatalf("peers: %v", err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: socketPath, Net: "unix"})
	if err != nil {
		t.Fatalf("peers: listen on %s: %v", socketPath, err)
	}
	t.Cleanup(func() { ln.Close() })
	if err := os.Chmod(socketPath, 0o660); err != nil {
		t.Fatalf("peers: %v", err)
	}
	return ln
}

// StartCoveNodeOn starts the cove-node command line argv (binary first, with --addr) as
// systemd starts a socket-activated service: ln is passed as fd 3 with LISTEN_FDS=1 and
// LISTEN_PID set to cove-node's own pid (by the shell right before it execs the binary,
// as systemd sets it in the forked child). It waits until /healthz answers on --addr.
// Stop sends SIGTERM and waits, as `systemctl stop` does; cleanup stops it too.
func StartCoveNodeOn(t testing.TB, ln *net.UnixListener, argv []string) *CoveNode {
	t.Helper()
	addr := ""
	for i, a := range argv {
		if a == "--addr" && i+1 < len(argv) {
			addr = argv[i+1]
		} else if v, ok := strings.CutPrefix(a, "--addr="); ok {
			addr = v
		}
	}
	if _, _, err := net.SplitHostPort(addr); err != nil || len(argv) < 2 {
		t.Fatalf("peers: StartCoveNodeOn: no usable --addr in %q", argv)
	}
	f, err := ln.File() // a dup: the listener stays open here too, like systemd's
	if err != nil {
		t.Fatalf("peers: %v", err)
	}
	defer f.Close()

	logPath := filepath.Join(t.TempDir(), "cove-node.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("peers: %v", err)
	}
	cmd := exec.Command("/bin/sh", append([]string{"-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"`}, argv...)...)
	cmd.Env = cleanEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{f} // fd 3
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	logf.Close()
	if err != nil {
		t.Fatalf("peers: start cove-node: %v", err)
	}
	// The grace covers cove-node's whole drain (up to 5 s of HTTP shutdown, then 5 s for
	// in-flight content calls), so Stop is a graceful stop, never a SIGKILL in disguise.
	p := &proc{name: "cove-node", cmd: cmd, logPath: logPath, done: make(chan struct{}), grace: 15 * time.Second}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.done)
	}()
	return awaitCoveNode(t, p, addr, logPath)
}
