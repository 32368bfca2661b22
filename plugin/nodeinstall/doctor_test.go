package nodeinstall

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"
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
