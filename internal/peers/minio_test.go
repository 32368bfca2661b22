package peers

import (
	"bytes"
	"context"
	"net/http"
	"strings"
	"syscall"
	"testing"

	"github.com/minio/minio-go/v7"
)

// StartMinIO: a real server on loopback with its bucket, credentials of its own that
// it enforces, gone after Stop (process and port), back with its data after Restart.
func TestMinIO(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	m := StartMinIO(t)
	other := StartMinIO(t)
	if !strings.HasPrefix(m.Addr, "127.0.0.1:") || m.AccessKey == other.AccessKey || m.SecretKey == other.SecretKey {
		t.Fatalf("servers %+v and %+v: want loopback and credentials of their own", m, other)
	}
	c, err := m.Client()
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := c.BucketExists(ctx, m.Bucket); !ok || err != nil {
		t.Fatalf("bucket %s: %v, %v", m.Bucket, ok, err)
	}
	if _, err := c.PutObject(ctx, m.Bucket, "k", bytes.NewReader([]byte("v")), 1, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	// Another server's credentials are refused.
	wrong := &MinIO{Addr: m.Addr, AccessKey: other.AccessKey, SecretKey: other.SecretKey}
	wc, err := wrong.Client()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := wc.BucketExists(ctx, m.Bucket); err == nil {
		t.Fatal("another server's credentials were accepted")
	}

	pid := m.Pid()
	m.Restart(t)
	if m.Pid() == pid {
		t.Fatal("Restart kept the old process")
	}
	if syscall.Kill(pid, 0) == nil {
		t.Fatalf("the old process %d still runs", pid)
	}
	if _, err := c.StatObject(ctx, m.Bucket, "k", minio.StatObjectOptions{}); err != nil {
		t.Fatalf("object lost over a restart: %v", err)
	}
	m.Stop()
	if _, err := http.Get(m.Endpoint + "/minio/health/live"); err == nil {
		t.Fatal("MinIO still answers after Stop")
	}
}
