package nodeinstall

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestValidateRefusesBadOptions(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "cove-node")
	os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755)
	good := func() *Options {
		return &Options{NoRestart: true, Binary: bin, Caches: []string{"http://127.0.0.1:5005"}, Roots: Roots{RootDir: t.TempDir()}}
	}
	for _, tc := range []struct {
		name   string
		change func(o *Options)
		want   string
	}{
		{"no cache", func(o *Options) { o.Caches = nil }, "--cache URL is required"},
		{"cache with a path", func(o *Options) { o.Caches = []string{"http://c:5005/v2/"} }, "--cache"},
		{"cache port 0", func(o *Options) { o.Caches = []string{"http://c:0"} }, "port out of range"},
		{"addr not loopback", func(o *Options) { o.Addr = "10.0.0.1:5006" }, "loopback"},
		{"addr 127.0.0.300", func(o *Options) { o.Addr = "127.0.0.300:5006" }, "not an IPv4 address"},
		{"metrics addr without a port", func(o *Options) { o.MetricsAddr = "10.0.0.1" }, "--metrics-addr"},
		{"metrics addr without a host", func(o *Options) { o.MetricsAddr = ":5007" }, "--metrics-addr"},
		{"metrics addr with a space", func(o *Options) { o.MetricsAddr = "10.0.0.1:5007 --addr=0.0.0.0:5006" }, "--metrics-addr"},
		{"metrics addr port 0", func(o *Options) { o.MetricsAddr = "10.0.0.1:0" }, "port out of range"},
		{"metrics addr is addr", func(o *Options) { o.MetricsAddr = DefaultAddr }, "its own port"},
		{"relative hosts dir", func(o *Options) { o.HostsDir = "certs.d" }, "absolute path"},
		{"hosts dir with ..", func(o *Options) { o.HostsDir = "/etc/../x" }, "no . or .."},
		{"config with a space", func(o *Options) { o.ContainerdConfig = "/etc/my config.toml" }, "only letters"},
		{"root dir without --no-restart", func(o *Options) { o.NoRestart = false }, "--no-restart"},
		{"root dir and host root", func(o *Options) { o.HostRoot = t.TempDir() }, "give one"},
		{"host root without systemctl", func(o *Options) { o.RootDir, o.HostRoot, o.NoRestart = "", t.TempDir(), false }, "--systemctl"},
		{"root dir missing", func(o *Options) { o.RootDir = "/nonexistent/cove" }, "not a directory"},
		{"binary missing", func(o *Options) { o.Binary = "/nonexistent/cove-node" }, "--binary"},
		{"cache-ca missing", func(o *Options) { o.CacheCA = "/nonexistent/ca.pem" }, "--cache-ca"},
		{"plain-http with a path", func(o *Options) { o.PlainHTTP = []string{"reg:5000/x"} }, "--origin-plain-http"},
		{"content socket too long", func(o *Options) {
			d := filepath.Join(t.TempDir(), strings.Repeat("d", 90))
			os.MkdirAll(d, 0o755)
			o.RootDir, o.ContentHook = d, true
		}, "107 bytes"},
	} {
		o := good()
		tc.change(o)
		err := o.Validate()
		var ue *UsageError
		if err == nil || !errors.As(err, &ue) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a usage error saying %q", tc.name, err, tc.want)
		}
	}
	if err := good().Validate(); err != nil {
		t.Errorf("good options: %v", err)
	}
}

func TestRootsMapPaths(t *testing.T) {
	sb := Roots{RootDir: "/sb"}
	host := Roots{HostRoot: "/host"}
	for _, tc := range []struct{ got, want string }{
		{sb.File("/etc/x"), "/sb/etc/x"}, {sb.Conf("/etc/x"), "/sb/etc/x"}, {sb.fileOfConf("/sb/etc/x"), "/sb/etc/x"},
		{host.File("/etc/x"), "/host/etc/x"}, {host.Conf("/etc/x"), "/etc/x"}, {host.fileOfConf("/etc/x"), "/host/etc/x"},
		{host.confOfFile("/host/etc/x"), "/etc/x"}, {Roots{}.File("/etc/x"), "/etc/x"}, {Roots{RootDir: "/"}.Conf("/etc/x"), "/etc/x"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %s, want %s", tc.got, tc.want)
		}
	}
}
