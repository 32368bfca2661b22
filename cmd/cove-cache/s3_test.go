package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
)

func TestS3FlagsFailClearly(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"serve", "--s3-endpoint", "http://127.0.0.1:9000"}, "--s3-endpoint needs --s3-bucket"},
		{[]string{"serve", "--s3-bucket", "b"}, "--s3-bucket needs --s3-endpoint"},
		{[]string{"serve", "--s3-endpoint", "127.0.0.1:9000", "--s3-bucket", "b"}, "--s3-endpoint"},
		{[]string{"serve", "--s3-endpoint", "http://127.0.0.1:9000/bucket", "--s3-bucket", "b"}, "no path"},
		{[]string{"serve", "--s3-endpoint", "http://key:topsecret@127.0.0.1:9000", "--s3-bucket", "b"}, "must not carry credentials"},
		{[]string{"serve", "--s3-endpoint", "http://127.0.0.1:9000", "--s3-bucket", "b", "--s3-region", ""}, "--s3-region"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(tt.args, &stdout, &stderr)
		if code != 2 || !strings.Contains(stderr.String(), tt.want) {
			t.Errorf("run(%q) = %d, stderr %q; want exit 2 mentioning %q", tt.args, code, stderr.String(), tt.want)
		}
		if strings.Contains(stderr.String(), "topsecret") {
			t.Errorf("run(%q) printed the secret: %q", tt.args, stderr.String())
		}
	}
}

// cove-cache on S3 refuses to start, saying why and never printing the secret, when the
// bucket is missing or the credentials are wrong.
func TestS3StartFailsClearly(t *testing.T) {
	m := peers.StartMinIO(t)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(t.TempDir(), "none"))
	t.Setenv("AWS_ACCESS_KEY_ID", m.AccessKey)
	for _, tt := range []struct {
		name, bucket, secret, want string
	}{
		{"missing bucket", "nothere", m.SecretKey, `bucket \"nothere\" does not exist`},
		{"wrong secret", m.Bucket, "wrong-" + m.SecretKey, "check the credentials"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("AWS_SECRET_ACCESS_KEY", tt.secret)
			var stdout, stderr bytes.Buffer
			code := run([]string{"serve", "--addr", "127.0.0.1:0", "--storage-dir", t.TempDir(),
				"--s3-endpoint", m.Endpoint, "--s3-bucket", tt.bucket}, &stdout, &stderr)
			if code != 1 || !strings.Contains(stderr.String(), tt.want) {
				t.Fatalf("exit %d, log %q; want exit 1 saying %q", code, stderr.String(), tt.want)
			}
			if strings.Contains(stderr.String(), m.SecretKey) {
				t.Fatalf("the log holds the secret: %q", stderr.String())
			}
		})
	}
}
