package nodeinstall

import (
	"context"
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
