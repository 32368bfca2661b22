package peers

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// etcd is the etcd server behind a KubeAPIServer: one member, loopback only, its data
// in a temporary directory.
type etcd struct {
	clientURL string
	logPath   string
	proc      *proc
}

// startEtcd starts bin with its client and peer listeners on free loopback ports and
// waits until it answers /health.
func startEtcd(bin, dir string) (*etcd, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	clientURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	args := []string{
		"--name", "cove-test",
		"--data-dir", filepath.Join(dir, "data"),
		"--listen-client-urls", clientURL, "--advertise-client-urls", clientURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "cove-test=" + peerURL,
		"--log-level", "warn",
	}
	if etcdHasNoFsync(bin) {
		// The data is thrown away with the test: durability only costs time on a busy disk.
		args = append(args, "--unsafe-no-fsync")
	}
	e := &etcd{clientURL: clientURL, logPath: filepath.Join(dir, "etcd.log")}
	e.proc, err = startProc("etcd", bin, args, etcdEnv(), e.logPath, e.logPath, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if err := waitHTTP(e.proc, clientURL+"/health", 30*time.Second); err != nil {
		e.proc.stop()
		return nil, fmt.Errorf("etcd at %s did not start: %v\netcd log %s (tail):\n%s", clientURL, err, e.logPath, logTail(e.logPath, 30))
	}
	return e, nil
}

var (
	noFsyncOnce sync.Once
	noFsync     bool
)

// etcdHasNoFsync tells whether this etcd knows --unsafe-no-fsync (3.5 and later; the
// Debian fallback of hack/tools.sh may be 3.4).
func etcdHasNoFsync(bin string) bool {
	noFsyncOnce.Do(func() {
		out, _ := exec.Command(bin, "--help").CombinedOutput()
		noFsync = strings.Contains(string(out), "unsafe-no-fsync")
	})
	return noFsync
}

// etcdEnv is cleanEnv without ETCD_* variables, which etcd reads as flags.
func etcdEnv() []string {
	var env []string
	for _, kv := range cleanEnv() {
		if !strings.HasPrefix(kv, "ETCD_") && !strings.HasPrefix(kv, "ETCDCTL_") {
			env = append(env, kv)
		}
	}
	return env
}
