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
		{[]string{"serve", "--addr", "0.0.0.0:5006"}, "loopback"},
		{[]string{"serve", "--addr", "nope"}, "--addr"},
		{[]string{"serve", "--cache", "cove-cache:5005"}, "--cache"},
		{[]string{"serve", "--cache", "http://user:pw@cache:5005"}, "--cache"},
		{[]string{"serve", "--cache", "ftp://cache:5005"}, "--cache"},
		{[]string{"serve", "--origin-plain-http", "a/b"}, "--origin-plain-http"},
		{[]string{"serve", "--header-timeout", "0s"}, "--header-timeout"},
		{[]string{"serve", "--header-timeout", "30s", "--slow-origin-timeout", "5s"}, "--slow-origin-timeout"},
		{[]string{"serve", "--content-socket", "relative.sock"}, "absolute"},
		{[]string{"print-containerd-config", "--content-socket", "rel.sock"}, "absolute"},
		{[]string{"print-containerd-config", "stray"}, "unexpected argument"},
		{[]string{"serve", "--log-level", "x"}, "--log-level"},
		{[]string{"serve", "--fallback", "maybe"}, "--fallback"},
		{[]string{"serve", "stray"}, "unexpected argument"},
		{[]string{"nope"}, "unknown command"},
		{nil, "Usage"},
	} {
		var out, errb bytes.Buffer
		if code := run(tt.args, &out, &errb); code != 2 || !strings.Contains(errb.String(), tt.want) {
			t.Errorf("run(%q) = %d, %q; want 2 mentioning %q", tt.args, code, errb.String(), tt.want)
		}
	}
}

func TestVersion(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"version"}, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "cove-node ") {
		t.Fatalf("version: %d %q", code, out.String())
	}
}

func TestPrintContainerdConfig(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"print-containerd-config", "--content-socket", "/run/cove-node/content.sock", "--root", "/var/lib/cove-node"}, &out, &errb); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	for _, want := range []string{"version = 3", `disabled_plugins = ["io.containerd.content.v1.content"]`, `address = "/run/cove-node/content.sock"`, `differ = "cove-diff"`} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("fragment lacks %q:\n%s", want, out.String())
		}
	}
}
