package peers

import (
	"net/http"
	"path/filepath"
	"testing"
)

func TestEtcdStartsAndStops(t *testing.T) {
	e, err := startEtcd(Bin(t, "etcd"), filepath.Join(t.TempDir(), "etcd"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.proc.stop)
	resp, err := http.Get(e.clientURL + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("etcd /health: %s", resp.Status)
	}
	e.proc.stop()
	if done, _ := e.proc.exited(); !done {
		t.Fatal("etcd still runs after stop")
	}
	if resp, err := http.Get(e.clientURL + "/health"); err == nil {
		resp.Body.Close()
		t.Fatal("etcd still answers after stop")
	}
}
