package nodeinstall

import (
	"strings"
	"testing"
)

func TestUnitFileRunsServeWithTheFlags(t *testing.T) {
	o := &Options{Roots: Roots{RootDir: "/sb"}, Addr: "127.0.0.1:5006", Caches: []string{"https://a:5443", "http://b:5005"},
		CacheCA: "/tmp/ca.pem", PlainHTTP: []string{"reg:5000"}}
	unit := o.unitFile("", "")
	want := "ExecStart=/sb/usr/local/bin/cove-node serve --addr 127.0.0.1:5006 --cache https://a:5443 --cache http://b:5005 --cache-ca /sb/etc/cove-node/cache-ca.pem --root /sb/var/lib/cove-node --origin-plain-http reg:5000\n"
	if !strings.Contains(unit, want) || strings.Contains(unit, "Requires=") {
		t.Errorf("unit:\n%s\nwant %s", unit, want)
	}
	o.ContentHook = true
	unit = o.unitFile("/var/lib/containerd", "/run/containerd/containerd.sock")
	for _, w := range []string{"--content-socket /sb/run/cove-node/content.sock", "--content-root /var/lib/containerd/io.containerd.content.v1.content", "Requires=cove-node.socket", "RestartSec=0"} {
		if !strings.Contains(unit, w) {
			t.Errorf("content-hook unit lacks %q:\n%s", w, unit)
		}
	}
	if s := o.socketUnitFile(); !strings.Contains(s, "ListenStream=/sb/run/cove-node/content.sock\n") {
		t.Errorf("socket unit:\n%s", s)
	}
}

func TestDropinFileParses(t *testing.T) {
	for _, hook := range []bool{false, true} {
		for _, v := range []int64{2, 3, 4} {
			if hook && v == 2 {
				continue
			}
			o := &Options{HostsDir: "/etc/containerd/certs.d", ContentHook: hook, Arch: "arm64"}
			m, err := decode([]byte(o.dropinFile(v)))
			if err != nil {
				t.Fatalf("hook %v version %d: %v", hook, v, err)
			}
			if criConfigPath(m) != "/etc/containerd/certs.d" {
				t.Errorf("hook %v version %d: config_path %q", hook, v, criConfigPath(m))
			}
			if _, ok := lookup(m, "proxy_plugins", "cove").(map[string]any); ok != hook {
				t.Errorf("hook %v version %d: proxy plugin present %v", hook, v, ok)
			}
		}
	}
}
