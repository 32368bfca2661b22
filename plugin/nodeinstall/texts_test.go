package nodeinstall

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"reflect"
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
	o.MetricsAddr = "10.0.0.7:5007"
	if unit := o.unitFile("", ""); !strings.Contains(unit, "ExecStart=/sb/usr/local/bin/cove-node serve --addr 127.0.0.1:5006 --metrics-addr 10.0.0.7:5007 --cache ") {
		t.Errorf("unit with a metrics address:\n%s", unit)
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

// --metrics-addr goes into the unit the install writes; a second install with it changes
// nothing; a new address changes the unit alone (cove-node restarts, containerd does
// not); the uninstall still puts the root back byte for byte.
func TestInstallWritesMetricsAddr(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "etc/containerd/config.toml"), "version = 3\n")
	before := tree(t, root)
	o := sandboxOptions(t, root)
	o.MetricsAddr = "10.0.0.7:5007"
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	if _, err := Install(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	unitFile := filepath.Join(root, UnitPath)
	unit, _ := os.ReadFile(unitFile)
	if !strings.Contains(string(unit), " --metrics-addr 10.0.0.7:5007 ") {
		t.Fatalf("unit lacks --metrics-addr:\n%s", unit)
	}
	installed := tree(t, root)
	if res, err := Install(context.Background(), o); err != nil || res.Changed {
		t.Fatalf("second install: %+v, %v", res, err)
	}
	if !reflect.DeepEqual(installed, tree(t, root)) {
		t.Error("the second install changed files")
	}

	o.MetricsAddr = "10.0.0.8:5007"
	res, err := Install(context.Background(), o)
	if err != nil || !res.Changed || res.RestartContainerd {
		t.Fatalf("install with a new metrics address: %+v, %v; want a change that leaves containerd alone", res, err)
	}
	// The unit, and the record of what the install left (its hash).
	mayChange := map[string]bool{strings.TrimPrefix(UnitPath, "/"): true, strings.TrimPrefix(filepath.Join(BackupDir, hashesName), "/"): true}
	for p, content := range tree(t, root) {
		if content != installed[p] && !mayChange[p] {
			t.Errorf("a new metrics address changed %s", p)
		}
	}
	if unit, _ := os.ReadFile(unitFile); !strings.Contains(string(unit), " --metrics-addr 10.0.0.8:5007 ") {
		t.Errorf("unit after the new address:\n%s", unit)
	}

	var out bytes.Buffer
	if err := Uninstall(context.Background(), &UninstallOptions{Roots: Roots{RootDir: root}, NoRestart: true, Out: &out, Err: &out}); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if !reflect.DeepEqual(before, tree(t, root)) {
		t.Error("uninstall: the root is not as it was")
	}
}
