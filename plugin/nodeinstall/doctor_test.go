package nodeinstall

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

func TestHasCaps(t *testing.T) {
	for _, tc := range []struct {
		host map[string]any
		want bool
	}{
		{map[string]any{}, true}, // containerd's default: pull, resolve, push
		{map[string]any{"capabilities": []any{"pull", "resolve"}}, true},
		{map[string]any{"capabilities": []any{"pull"}}, false},
		{map[string]any{"capabilities": "pull"}, false},
	} {
		if got := hasCaps(tc.host, "pull", "resolve"); got != tc.want {
			t.Errorf("hasCaps(%v) = %v", tc.host, got)
		}
	}
}

// A node without containerd's config: config_path fails, and so does the whole report.
func TestDoctorWithoutConfigFails(t *testing.T) {
	root := t.TempDir()
	checks := Doctor(context.Background(), DoctorOptions{Roots: Roots{RootDir: root}, ContainerdAddress: filepath.Join(root, "none.sock"),
		Addr: "127.0.0.1:1", Timeout: 500 * time.Millisecond})
	if !Failed(checks) {
		t.Fatalf("no failure: %v", checks)
	}
	var b strings.Builder
	Report(&b, checks)
	for _, want := range []string{"fail config_path: no containerd config", "fail containerd: no containerd answers", "fail cove-node: cove-node does not answer", "-- fix: "} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, b.String())
		}
	}
}

// Something else on cove-node's address that answers /healthz is not taken for cove-node.
func TestDoctorProbeWantsARegistryEndpoint(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ok")
	}))
	defer srv.Close()
	d := &doctor{DoctorOptions: DoctorOptions{Addr: strings.TrimPrefix(srv.URL, "http://"), Timeout: 2 * time.Second}, addrFrom: "--addr"}
	d.checkCoveNode(context.Background())
	if len(d.checks) != 1 || d.checks[0].Verdict != Fail || !strings.Contains(d.checks[0].Detail, "no registry endpoint") {
		t.Errorf("checks %v", d.checks)
	}
}

// doctor probes the metrics listener the installed unit names: ok on a live cove-node's
// (0.0.0.0 probed on loopback), a warning where nothing answers, no line without one.
func TestDoctorProbesMetricsListener(t *testing.T) {
	_, port, _ := net.SplitHostPort(freeAddr(t))
	node := peers.StartCoveNode(t, nil, "--metrics-addr", "127.0.0.1:"+port)

	check := func(metricsFlag string) []Check {
		t.Helper()
		root := t.TempDir()
		write(t, filepath.Join(root, UnitPath), "[Service]\nExecStart=/usr/local/bin/cove-node serve --addr "+node.Addr+metricsFlag+" --root /var/lib/cove-node\n")
		d := &doctor{DoctorOptions: DoctorOptions{Roots: Roots{RootDir: root}, Timeout: 2 * time.Second}}
		d.addr()
		if d.Addr != node.Addr {
			t.Fatalf("address %q from the unit, want %q", d.Addr, node.Addr)
		}
		d.checkMetricsListener(context.Background())
		return d.checks
	}
	for _, a := range []string{"127.0.0.1:" + port, "0.0.0.0:" + port, "[127.0.0.1]:" + port} {
		if c := check(" --metrics-addr " + a); len(c) != 1 || c[0].Name != "metrics" || c[0].Verdict != OK {
			t.Errorf("--metrics-addr %s: %v, want metrics ok", a, c)
		}
	}
	// Nothing listening there: a warning.
	if c := check(" --metrics-addr " + freeAddr(t)); len(c) != 1 || c[0].Verdict != Warn || !strings.Contains(c[0].Detail, "scrapers get no cove-node metrics") {
		t.Errorf("nothing listening: %v, want a warning", c)
	}
	if c := check(""); len(c) != 0 {
		t.Errorf("no --metrics-addr: %v, want no check", c)
	}
}

// freeAddr is a 127.0.0.1 address nothing listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
