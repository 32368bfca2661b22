package main

import (
	"bytes"
	"crypto/tls"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cove-oci/cove/internal/testpki"
)

func TestBadFlagsFailClearly(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"serve", "--addr", "0.0.0.0:5006"}, "loopback"},
		{[]string{"serve", "--addr", "nope"}, "--addr"},
		{[]string{"serve", "--metrics-addr", "nope"}, "--metrics-addr"},
		{[]string{"serve", "--metrics-addr", ":5007"}, "name the host"},
		{[]string{"serve", "--metrics-addr", "10.0.0.1:metrics"}, "--metrics-addr"},
		{[]string{"serve", "--metrics-addr", "10.0.0.1:70000"}, "--metrics-addr"},
		{[]string{"serve", "--addr", "127.0.0.1:5006", "--metrics-addr", "127.0.0.1:5006"}, "its own port"},
		{[]string{"serve", "--cache", "cove-cache:5005"}, "--cache"},
		{[]string{"serve", "--cache", "http://user:pw@cache:5005"}, "--cache"},
		{[]string{"serve", "--cache", "ftp://cache:5005"}, "--cache"},
		{[]string{"serve", "--origin-plain-http", "a/b"}, "--origin-plain-http"},
		{[]string{"serve", "--header-timeout", "0s"}, "--header-timeout"},
		{[]string{"serve", "--around-cache-window", "-1s"}, "--around-cache-window"},
		{[]string{"serve", "--header-timeout", "30s", "--slow-origin-timeout", "5s"}, "--slow-origin-timeout"},
		{[]string{"serve", "--content-socket", "relative.sock"}, "absolute"},
		{[]string{"print-containerd-config", "--content-socket", "rel.sock"}, "absolute"},
		{[]string{"print-containerd-config", "stray"}, "unexpected argument"},
		{[]string{"serve", "--log-level", "x"}, "--log-level"},
		{[]string{"serve", "--fallback", "maybe"}, "--fallback"},
		{[]string{"serve", "stray"}, "unexpected argument"},
		{[]string{"serve", "--kubeconfig", "/k"}, "--kubeconfig needs --caches-from-endpointslices"},
		{[]string{"serve", "--caches-from-endpointslices", "cove-cache"}, "NAMESPACE/SERVICE"},
		{[]string{"serve", "--caches-from-endpointslices", "cove/a/b"}, "NAMESPACE/SERVICE"},
		{[]string{"serve", "--caches-from-endpointslices", "Cove/cove-cache"}, "namespace"},
		{[]string{"serve", "--caches-from-endpointslices", "cove/cove_cache"}, "service"},
		{[]string{"serve", "--caches-from-endpointslices", "cove/cove-cache", "--caches-port-name", "no spaces"}, "--caches-port-name"},
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

func TestTLSCacheCA(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "ca.pem")
	mustWrite(t, good, testpki.NewCA(t, "test CA").PEM)
	empty := filepath.Join(dir, "empty.pem")
	mustWrite(t, empty, nil)
	keyOnly := filepath.Join(dir, "key.pem")
	mustWrite(t, keyOnly, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte("x")}))
	broken := filepath.Join(dir, "broken.pem")
	mustWrite(t, broken, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("not DER")}))

	for _, f := range []string{filepath.Join(dir, "missing.pem"), empty, keyOnly, broken} {
		var out, errb bytes.Buffer
		if code := run([]string{"serve", "--cache", "https://cache:5005", "--cache-ca", f}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "--cache-ca") {
			t.Errorf("--cache-ca %s: exit %d, %q; want 2 mentioning --cache-ca", f, code, errb.String())
		}
	}
	var errb bytes.Buffer
	o, err := parseServe([]string{"--cache", "https://cache:5005", "--cache-ca", good}, &errb)
	if err != nil {
		t.Fatal(err)
	}
	if o.cfg.TLSConfig == nil || o.cfg.TLSConfig.RootCAs == nil || o.cfg.TLSConfig.MinVersion != tls.VersionTLS12 {
		t.Fatalf("TLSConfig = %+v", o.cfg.TLSConfig)
	}
	if o, err = parseServe([]string{"--cache", "https://cache:5005"}, &errb); err != nil || o.cfg.TLSConfig != nil {
		t.Fatalf("without --cache-ca: TLSConfig %+v, %v; want nil (system roots)", o.cfg.TLSConfig, err)
	}
}

func mustWrite(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// Outside a pod, without --kubeconfig, there is no API configuration: cove-node says so
// and stops, rather than run without the replicas it was told to follow.
func TestServeEndpointSlicesNeedsAPIConfig(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	var out, errb bytes.Buffer
	code := run([]string{"serve", "--addr", "127.0.0.1:0", "--root", t.TempDir(), "--caches-from-endpointslices", "cove/cove-cache"}, &out, &errb)
	if code != 1 || !strings.Contains(errb.String(), "Kubernetes API configuration") {
		t.Fatalf("exit %d, %q; want 1 naming the Kubernetes API configuration", code, errb.String())
	}
}

// --metrics-addr may name an address off loopback (the node's, for Prometheus): only the
// resolver hook's --addr must be loopback.
func TestServeMetricsAddrOffLoopback(t *testing.T) {
	var errb bytes.Buffer
	// [10.0.0.1]:5007 is what the DaemonSet's [$(NODE_IP)]:5007 becomes on an IPv4 node.
	for _, a := range []string{"10.0.0.1:5007", "0.0.0.0:5007", "[fd00::1]:5007", "[10.0.0.1]:5007", "127.0.0.1:5007"} {
		o, err := parseServe([]string{"--metrics-addr", a}, &errb)
		if err != nil || o.metricsAddr != a || o.addr != "127.0.0.1:5006" {
			t.Errorf("--metrics-addr %s: %+v, %v", a, o, err)
		}
	}
	if o, err := parseServe(nil, &errb); err != nil || o.metricsAddr != "" {
		t.Errorf("default --metrics-addr %q, %v; want none", o.metricsAddr, err)
	}
}
