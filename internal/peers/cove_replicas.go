package peers

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// CoveReplicas is a cluster of cove-cache replicas on loopback (--peer, docs/scaleout.md).
type CoveReplicas struct {
	Replicas []*Cove
	// SecretFile holds the peer secret every replica was given; Secret is its content.
	SecretFile string
	Secret     []byte
}

// StartCoveReplicas starts n cove-cache replicas of one cluster, each on its own free
// loopback port and --storage-dir, with --peer naming every replica, --advertise-url
// its own, a fresh random --peer-secret-file, and the extra flags (the shared storage:
// --s3-endpoint, --s3-bucket). Every replica's flags name all ports, so the ports are
// chosen before any replica starts; one taken by another process in between fails the
// test. The replicas are stopped at cleanup. A replica is not to be Restarted (that
// picks a new port the others do not know).
func StartCoveReplicas(t testing.TB, n int, extra ...string) *CoveReplicas {
	t.Helper()
	return StartCoveReplicasWith(t, n, func(urls []string) []string {
		var flags []string
		for _, u := range urls {
			flags = append(flags, "--peer", u)
		}
		return flags
	}, extra...)
}

// StartCoveReplicasWith is StartCoveReplicas with the membership flags given by
// membership from the replicas' URLs (e.g. --peers-from-endpointslices instead of --peer).
func StartCoveReplicasWith(t testing.TB, n int, membership func(urls []string) []string, extra ...string) *CoveReplicas {
	t.Helper()
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		t.Fatal(err)
	}
	cr := &CoveReplicas{SecretFile: filepath.Join(t.TempDir(), "peer-secret"), Secret: []byte(hex.EncodeToString(secret))}
	if err := os.WriteFile(cr.SecretFile, cr.Secret, 0o600); err != nil {
		t.Fatal(err)
	}
	addrs := map[string]bool{}
	var urls []string
	for len(addrs) < n {
		port, err := freePort()
		if err != nil {
			t.Fatalf("peers: %v", err)
		}
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		if addrs[addr] {
			continue
		}
		addrs[addr] = true
		cr.Replicas = append(cr.Replicas, &Cove{Addr: addr, URL: "http://" + addr, StorageDir: t.TempDir()})
		urls = append(urls, "http://"+addr)
	}
	peerFlags := membership(urls)
	bin := CoveBinary(t, "cove-cache")
	logDir := t.TempDir()
	for i, c := range cr.Replicas {
		c.args = append(append(append([]string{}, extra...), peerFlags...), "--advertise-url", c.URL, "--peer-secret-file", cr.SecretFile)
		c.LogPath = filepath.Join(logDir, fmt.Sprintf("cove-cache-replica-%d.log", i))
		args := append([]string{"serve", "--addr", c.Addr, "--storage-dir", c.StorageDir, noDrain}, c.args...)
		p, err := startProc("cove-cache", bin, args, cleanEnv(), c.LogPath, c.LogPath, 10*time.Second)
		if err != nil {
			t.Fatalf("peers: start replica %d: %v", i, err)
		}
		c.proc = p
		t.Cleanup(c.Stop)
		if err := waitReady(p, readyClient, c.URL+"/readyz", 10*time.Second, false); err != nil {
			t.Fatalf("peers: replica %d (%s) did not become ready: %v\n%s", i, c.Addr, err, logTail(c.LogPath, 30))
		}
	}
	return cr
}
