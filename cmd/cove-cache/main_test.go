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
		{[]string{"serve", "--storage-dir", ""}, "--storage-dir"},
		{[]string{"serve", "--stall-timeout", "0s"}, "--stall-timeout"},
		{[]string{"serve", "--log-level", "loud"}, "--log-level"},
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
