package main

import (
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "cove-cache.toml")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// The file's keys mirror the flags; flags on the command line win.
func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	p := writeConfig(t, `
# cove-cache serve settings
addr = "127.0.0.1:6000"
storage_dir = "`+dir+`"
storage_max_size = "64MiB"
storage_min_free = "10%"
pin = ["docker.io/library/nginx:1.*", "127.0.0.1:5000/team/*:v1"]
origin_plain_http = ["127.0.0.1:5000"]
authz_ttl = "3s"
`)
	o, err := parseServe([]string{"--config", p, "--addr", "127.0.0.1:7000"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.addr != "127.0.0.1:7000" {
		t.Errorf("addr = %q: the command line must win", o.addr)
	}
	if o.storageDir != dir || o.bound.maxBytes != 64<<20 || o.bound.free.Percent != 10 || o.authzTTL != 3*time.Second {
		t.Errorf("from the file: dir %q, max %d, min free %+v, authz ttl %s", o.storageDir, o.bound.maxBytes, o.bound.free, o.authzTTL)
	}
	if want := []string{"docker.io/library/nginx:1.*", "127.0.0.1:5000/team/*:v1"}; !reflect.DeepEqual([]string(o.bound.pins), want) {
		t.Errorf("pins = %q, want %q", o.bound.pins, want)
	}
	if want := []string{"127.0.0.1:5000"}; !reflect.DeepEqual([]string(o.plainHTTP), want) {
		t.Errorf("origin_plain_http = %q", o.plainHTTP)
	}
	// A repeatable flag on the command line replaces the file's list.
	o, err = parseServe([]string{"--config", p, "--pin", "reg.example/a:b"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"reg.example/a:b"}; !reflect.DeepEqual([]string(o.bound.pins), want) {
		t.Errorf("pins = %q, want %q", o.bound.pins, want)
	}
}

func TestConfigFileErrors(t *testing.T) {
	for _, tt := range []struct {
		text, want string
	}{
		{"addr = \"127.0.0.1:6000\"\n\nstorage_max_sise = \"1GiB\"\n", `:3: unknown key "storage_max_sise"`},
		{"[storage]\nmax_size = \"1GiB\"\n", `unknown key "storage"`},
		{"storage_max_size = \"1GB\"\n", "--storage-max-size"},
		{"pin = [\"nginx\"]\n", "--pin"},
		{"addr = [\"a\", \"b\"]\n", "addr: a list is only for repeatable keys"},
		{"addr = \n", "cove-cache.toml:1"},
		{"config = \"other.toml\"\n", `unknown key "config"`},
	} {
		p := writeConfig(t, tt.text)
		_, err := parseServe([]string{"--config", p}, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("config %q: error %v, want one containing %q", tt.text, err, tt.want)
		}
	}
	if _, err := parseServe([]string{"--config", filepath.Join(t.TempDir(), "missing.toml")}, io.Discard); err == nil {
		t.Error("a missing config file accepted")
	}
}

func TestBoundFlags(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--storage-max-size", "100MB"}, "--storage-max-size"},
		{[]string{"--storage-max-size", "0"}, "--storage-max-size"},
		{[]string{"--storage-min-free", "120%"}, "--storage-min-free"},
		{[]string{"--pin", "[bad/x"}, "--pin"},
		{[]string{"--s3-endpoint", "http://127.0.0.1:9000", "--s3-bucket", "b", "--storage-min-free", "10%"}, "--storage-min-free"},
	} {
		if _, err := parseServe(tt.args, io.Discard); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("parseServe(%q) = %v, want an error about %s", tt.args, err, tt.want)
		}
	}
	o, err := parseServe([]string{"--storage-max-size", "500GiB", "--storage-min-free", "20GiB"}, io.Discard)
	if err != nil || o.bound.maxBytes != 500<<30 || o.bound.free.Bytes != 20<<30 {
		t.Fatalf("parseServe: %+v, %v", o, err)
	}
}
