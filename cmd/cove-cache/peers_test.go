package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPeerFlagsFailClearly(t *testing.T) {
	s3 := []string{"serve", "--s3-endpoint", "http://127.0.0.1:9000", "--s3-bucket", "b"}
	two := []string{"--peer", "http://10.0.0.1:5005", "--peer", "http://10.0.0.2:5005"}
	with := func(parts ...[]string) []string {
		var out []string
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{with(s3, []string{"--advertise-url", "http://10.0.0.1:5005"}), "need --peer"},
		{with(s3, []string{"--peer-secret-file", "/x"}), "need --peer"},
		{with(s3, two, []string{"--peer-secret-file", "/x"}), "--peer needs --advertise-url"},
		{with(s3, two, []string{"--advertise-url", "http://10.0.0.1:5005"}), "--peer-secret-file"},
		{with([]string{"serve"}, two, []string{"--advertise-url", "http://10.0.0.1:5005", "--peer-secret-file", "/x"}), "--s3-endpoint"},
		{with(s3, two, []string{"--advertise-url", "http://10.0.0.1:5005", "--peer-secret-file", "/x", "--peer-sync-interval", "0s"}), "--peer-sync-interval must be positive"},
		{with(s3, two, []string{"--advertise-url", "http://10.0.0.3:5005", "--peer-secret-file", "/x"}), "not among the --peer"},
		{with(s3, two, []string{"--advertise-url", "10.0.0.1:5005", "--peer-secret-file", "/x"}), "--advertise-url"},
		{with(s3, []string{"--peer", "10.0.0.1:5005", "--advertise-url", "http://10.0.0.1:5005", "--peer-secret-file", "/x"}), "--peer"},
		{with(s3, []string{"--peer", "http://10.0.0.1:5005/v2", "--advertise-url", "http://10.0.0.1:5005", "--peer-secret-file", "/x"}), "--peer"},
		{with(s3, two, []string{"--peers-from-endpointslices", "cove/cove-cache", "--advertise-url", "http://10.0.0.1:5005", "--peer-secret-file", "/x"}), "exclude each other"},
		{with(s3, []string{"--peers-from-endpointslices", "cove-cache", "--advertise-url", "http://10.0.0.1:5005", "--peer-secret-file", "/x"}), "NAMESPACE/SERVICE"},
		{with(s3, []string{"--peers-from-endpointslices", "cove/cove-cache", "--peer-secret-file", "/x"}), "--peers-from-endpointslices needs --advertise-url"},
		{with([]string{"serve", "--peers-from-endpointslices", "cove/cove-cache", "--advertise-url", "http://10.0.0.1:5005", "--peer-secret-file", "/x"}), "--s3-endpoint"},
		{with(s3, []string{"--kubeconfig", "/x"}), "--kubeconfig needs --peers-from-endpointslices"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(tt.args, &stdout, &stderr)
		if code != 2 || !strings.Contains(stderr.String(), tt.want) {
			t.Errorf("run(%q) = %d, stderr %q; want exit 2 mentioning %q", tt.args, code, stderr.String(), tt.want)
		}
	}
}

// A secret file that is missing or too short stops cove-cache before it serves, with a
// message that names the file and never the secret.
func TestPeerSecretFileUnusable(t *testing.T) {
	dir := t.TempDir()
	short := filepath.Join(dir, "short")
	if err := os.WriteFile(short, []byte("hunter2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, file := range []string{short, filepath.Join(dir, "absent")} {
		var stdout, stderr bytes.Buffer
		args := []string{"serve", "--addr", "127.0.0.1:0", "--storage-dir", t.TempDir(),
			"--s3-endpoint", "http://127.0.0.1:1", "--s3-bucket", "b",
			"--peer", "http://127.0.0.1:5005", "--advertise-url", "http://127.0.0.1:5005", "--peer-secret-file", file}
		if code := run(args, &stdout, &stderr); code != 1 {
			t.Fatalf("serve with secret file %s: exit %d, %s", file, code, stderr.String())
		}
		if !strings.Contains(stderr.String(), "--peer-secret-file") || strings.Contains(stderr.String(), "hunter2") {
			t.Fatalf("serve with secret file %s: %s", file, stderr.String())
		}
	}
}
