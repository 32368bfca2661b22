package nodeinstall

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// recordingSystemctl is a systemctl for a sandbox: no systemd runs here, so a script
// records each call in log and answers is-active with "inactive"; `restart containerd`
// fails while the file failRestart exists (containerd refusing its new configuration).
func recordingSystemctl(t *testing.T) (cmd []string, log, failRestart string) {
	t.Helper()
	dir := t.TempDir()
	log, failRestart = filepath.Join(dir, "calls"), filepath.Join(dir, "fail-restart")
	script := filepath.Join(dir, "systemctl")
	write(t, script, `#!/bin/sh
echo "$*" >> `+log+`
case "$*" in
"is-active --quiet "*) exit 3 ;;
"restart containerd") [ -e `+failRestart+` ] && exit 1 ;;
esac
exit 0
`)
	os.Chmod(script, 0o755)
	return []string{script}, log, failRestart
}

func calls(t *testing.T, log string) []string {
	b, _ := os.ReadFile(log)
	os.Remove(log)
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// The install starts what it changed, restarts containerd only when its configuration
// changed, and when containerd does not come back on the new configuration, puts every
// file back and restarts containerd on the old one.
func TestServicesFollowWhatChanged(t *testing.T) {
	host := t.TempDir()
	write(t, filepath.Join(host, "etc/containerd/config.toml"), "version = 3\n")
	sysctl, log, failRestart := recordingSystemctl(t)
	o := sandboxOptions(t, t.TempDir())
	o.RootDir, o.HostRoot, o.NoRestart, o.Systemctl, o.ContainerdBin = "", host, false, sysctl, ""
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	if _, err := Install(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	want := []string{"is-active --quiet cove-node.service", "is-active --quiet cove-node.socket", "daemon-reload",
		"enable --now cove-node.service", "restart containerd"}
	if got := calls(t, log); !reflect.DeepEqual(got, want) {
		t.Errorf("first install: systemctl %q, want %q", got, want)
	}
	if _, err := Install(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	if got := calls(t, log); slices.Contains(got, "restart containerd") {
		t.Errorf("an install that changed nothing restarted containerd: %q", got)
	}

	// A new --addr changes hosts.toml and the unit only: cove-node, not containerd.
	o.Addr = "127.0.0.1:5999"
	write(t, failRestart, "")
	o.Caches = []string{"http://127.0.0.1:5007"}
	if _, err := Install(context.Background(), o); err != nil {
		t.Fatalf("an install that leaves containerd's config alone restarted containerd: %v", err)
	}
	calls(t, log)
	// A new hosts directory changes the drop-in: containerd restarts, fails, and the
	// install is rolled back.
	mid := tree(t, host)
	o.HostsDir = "/etc/containerd/hosts.d"
	_, err := Install(context.Background(), o)
	if !errors.Is(err, ErrRolledBack) {
		t.Fatalf("containerd failing on the new configuration: %v, want ErrRolledBack", err)
	}
	got := calls(t, log)
	if n := len(got); n < 2 || got[n-2] != "daemon-reload" || got[n-1] != "restart containerd" {
		t.Errorf("after the rollback containerd is not restarted on the old files: %q", got)
	}
	if !reflect.DeepEqual(mid, tree(t, host)) {
		t.Error("the rollback left files changed")
	}
}
