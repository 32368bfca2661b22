package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestBadFlagsFailClearly(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"serve", "--addr", "nohostport"}, "--addr"},
		{[]string{"serve", "--origin-plain-http", "a/b"}, "--origin-plain-http"},
		{[]string{"serve", "--origin-plain-http", "http://x:5000"}, "--origin-plain-http"},
		{[]string{"serve", "--default-registry", "not a host"}, "--default-registry"},
		{[]string{"serve", "--origin-allow", "10.0.0.0/33"}, "--origin-allow"},
		{[]string{"serve", "--origin-allow", "http://x"}, "--origin-allow"},
		{[]string{"serve", "--origin-deny", "a..b"}, "--origin-deny"},
		{[]string{"serve", "--origin-deny", "x:99999"}, "--origin-deny"},
		{[]string{"serve", "--storage-dir", ""}, "--storage-dir"},
		{[]string{"serve", "--external-url", "cove.example:5005"}, "--external-url"},
		{[]string{"serve", "--external-url", "https://cove.example/token"}, "--external-url"},
		{[]string{"serve", "--external-url", "https://u:p@cove.example"}, "--external-url"},
		{[]string{"serve", "--stall-timeout", "0s"}, "--stall-timeout"},
		{[]string{"serve", "--log-level", "loud"}, "--log-level"},
		{[]string{"serve", "--offline", "sometimes"}, "--offline"},
		{[]string{"serve", "--offline", "recent", "--offline-max-age", "0s"}, "--offline-max-age"},
		{[]string{"serve", "--log-format", "xml"}, "--log-format"},
		{[]string{"serve", "--no-such-flag"}, "no-such-flag"},
		{[]string{"serve", "extra"}, "unexpected argument"},
		{[]string{"frobnicate"}, "unknown command"},
		{nil, "Usage"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(tt.args, &stdout, &stderr)
		if code != 2 || !strings.Contains(stderr.String(), tt.want) {
			t.Errorf("run(%q) = %d, stderr %q; want exit 2 mentioning %q", tt.args, code, stderr.String(), tt.want)
		}
	}
}

func TestVersion(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"version"}, &stdout, &stderr); code != 0 || !strings.HasPrefix(stdout.String(), "cove-cache ") {
		t.Fatalf("version: %d %q", code, stdout.String())
	}
}

func TestStorageDirUnusable(t *testing.T) {
	var stdout, stderr bytes.Buffer
	file := t.TempDir() + "/file"
	if err := writeFile(file); err != nil {
		t.Fatal(err)
	}
	if code := run([]string{"serve", "--addr", "127.0.0.1:0", "--storage-dir", file}, &stdout, &stderr); code != 1 {
		t.Fatalf("serve on a file as storage dir: exit %d, %s", code, stderr.String())
	}
	if !strings.Contains(stderr.String(), "opening storage failed") {
		t.Fatalf("unclear error: %s", stderr.String())
	}
}

func TestTLSFlags(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"serve", "--tls-cert", dir + "/tls.crt"}, 2, "--tls-cert and --tls-key go together"},
		{[]string{"serve", "--tls-key", dir + "/tls.key"}, 2, "--tls-cert and --tls-key go together"},
		{[]string{"serve", "--addr", "127.0.0.1:0", "--storage-dir", dir + "/s", "--tls-cert", dir + "/no.crt", "--tls-key", dir + "/no.key"}, 1, "TLS certificate unusable"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(tt.args, &stdout, &stderr)
		if code != tt.code || !strings.Contains(stderr.String(), tt.want) {
			t.Errorf("run(%q) = %d, stderr %q; want exit %d mentioning %q", tt.args, code, stderr.String(), tt.code, tt.want)
		}
	}
	// Garbage files: unusable too, and said so before listening.
	if err := writeFile(dir + "/bad.crt"); err != nil {
		t.Fatal(err)
	}
	if err := writeFile(dir + "/bad.key"); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	code := run([]string{"serve", "--addr", "127.0.0.1:0", "--storage-dir", dir + "/s", "--tls-cert", dir + "/bad.crt", "--tls-key", dir + "/bad.key"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "TLS certificate unusable") || !strings.Contains(stderr.String(), "bad.crt") {
		t.Fatalf("garbage pair: exit %d, %s", code, stderr.String())
	}
	o, err := parseServe([]string{"--tls-cert", "a.crt", "--tls-key", "a.key"}, &stderr)
	if err != nil || o.tlsCert != "a.crt" || o.tlsKey != "a.key" {
		t.Fatalf("parseServe: %+v, %v", o, err)
	}
}
