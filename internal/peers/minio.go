package peers

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// MinIO is a running MinIO server: real S3-compatible storage for the S3 backend's
// tests. It runs as a separate process only (MinIO is AGPL; none of its code is
// imported), built by hack/tools.sh.
type MinIO struct {
	// Addr is 127.0.0.1:PORT; Endpoint is http://Addr, the form cove's --s3-endpoint takes.
	Addr, Endpoint string
	// Bucket was created empty at start.
	Bucket string
	// AccessKey and SecretKey are the root credentials, random per server.
	AccessKey, SecretKey string
	// Dir holds the data; LogPath the server's output.
	Dir, LogPath string

	proc      *proc
	bin       string
	args, env []string
}

// StartMinIO starts MinIO on a free loopback port with a temporary data directory and
// random root credentials, waits for /minio/health/live, creates an empty bucket, and
// stops the server at cleanup (also when the test fails).
func StartMinIO(t testing.TB) *MinIO {
	t.Helper()
	bin := Bin(t, "minio")
	base := t.TempDir()
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		m, err := startMinIO(bin, base, attempt)
		if err == nil {
			// Cleanup stops whichever process runs then (Restart replaces it).
			t.Cleanup(func() { m.Stop() })
			if err := m.MakeBucket(context.Background(), m.Bucket); err != nil {
				t.Fatalf("peers: %v", err)
			}
			return m
		}
		lastErr = err
		if !strings.Contains(err.Error(), "address already in use") && !strings.Contains(err.Error(), "bind") {
			break
		}
	}
	t.Fatalf("peers: %v", lastErr)
	return nil
}

func startMinIO(bin, base string, attempt int) (*MinIO, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	consolePort, err := freePort()
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(base, fmt.Sprintf("minio-%d", attempt))
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o755); err != nil {
		return nil, err
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	m := &MinIO{
		Addr:      addr,
		Endpoint:  "http://" + addr,
		Bucket:    "cove-test",
		AccessKey: "cove" + randomHex(8),
		SecretKey: randomHex(20),
		Dir:       dir,
		LogPath:   filepath.Join(dir, "minio.log"),
	}
	env := minioEnv(
		"MINIO_ROOT_USER="+m.AccessKey,
		"MINIO_ROOT_PASSWORD="+m.SecretKey,
		"MINIO_BROWSER=off",
		"MINIO_UPDATE=off",
		"MINIO_CI_CD=1", // no colour, no terminal banner
	)
	args := []string{"server", filepath.Join(dir, "data"), "--quiet",
		"--address", addr, "--console-address", fmt.Sprintf("127.0.0.1:%d", consolePort)}
	m.bin, m.args, m.env = bin, args, env
	return m, m.start()
}

func (m *MinIO) start() error {
	p, err := startProc("minio", m.bin, m.args, m.env, m.LogPath, m.LogPath, 5*time.Second)
	if err != nil {
		return err
	}
	m.proc = p
	if err := waitHTTP(p, m.Endpoint+"/minio/health/live", 30*time.Second); err != nil {
		p.stop()
		return fmt.Errorf("minio at %s did not start: %v\nminio log %s (tail):\n%s", m.Addr, err, m.LogPath, logTail(m.LogPath, 30))
	}
	return nil
}

// Restart starts a stopped server again on the same address, data and credentials (what
// a store that comes back looks like to its clients).
func (m *MinIO) Restart(t testing.TB) {
	t.Helper()
	m.Stop()
	if err := m.start(); err != nil {
		t.Fatalf("peers: %v", err)
	}
}

// minioEnv is cleanEnv without the host's MinIO and AWS settings, plus extra.
func minioEnv(extra ...string) []string {
	var env []string
	for _, kv := range cleanEnv() {
		if strings.HasPrefix(kv, "MINIO_") || strings.HasPrefix(kv, "AWS_") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// Client is a minio-go client with the root credentials, for tests that look at the
// bucket directly (objects, incomplete uploads).
func (m *MinIO) Client() (*minio.Client, error) {
	return minio.New(m.Addr, &minio.Options{
		Creds:  credentials.NewStaticV4(m.AccessKey, m.SecretKey, ""),
		Region: "us-east-1",
	})
}

// MakeBucket creates bucket name, retrying while the server finishes starting.
func (m *MinIO) MakeBucket(ctx context.Context, name string) error {
	c, err := m.Client()
	if err != nil {
		return err
	}
	var lastErr error
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if lastErr = c.MakeBucket(ctx, name, minio.MakeBucketOptions{Region: "us-east-1"}); lastErr == nil {
			return nil
		}
		if minio.ToErrorResponse(lastErr).Code == "BucketAlreadyOwnedByYou" {
			return nil
		}
	}
	return fmt.Errorf("minio: create bucket %s: %v\n%s", name, lastErr, logTail(m.LogPath, 20))
}

// Env is the standard AWS environment that gives a program (cove-cache) this server's
// credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
func (m *MinIO) Env() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + m.AccessKey, "AWS_SECRET_ACCESS_KEY=" + m.SecretKey}
}

// SetEnv gives this process's children (a cove-cache under test) the server's
// credentials through the standard AWS variables only, with no shared credentials file
// of the machine's, for the rest of the test.
func (m *MinIO) SetEnv(t testing.TB) {
	t.Setenv("AWS_ACCESS_KEY_ID", m.AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", m.SecretKey)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
}

// Pid is the server's process id (for RSS readings).
func (m *MinIO) Pid() int { return m.proc.cmd.Process.Pid }

// Stop kills the server and waits for it. Idempotent.
func (m *MinIO) Stop() { m.proc.stop() }
