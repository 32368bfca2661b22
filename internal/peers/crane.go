package peers

import (
	"encoding/base64"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Crane runs the crane binary with --insecure (plain HTTP to registryHost) and a docker
// config of its own that holds user's credentials for registryHost (none when user is
// ""), as `crane auth login` would write it. It returns crane's trimmed output.
func Crane(t testing.TB, registryHost, user, password string, args ...string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	auths := map[string]any{}
	if user != "" {
		auths[registryHost] = map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + password))}
	}
	b, err := json.Marshal(map[string]any{"auths": auths})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), Bin(t, "crane"), append([]string{"--insecure"}, args...)...)
	cmd.Env = append(os.Environ(), "DOCKER_CONFIG="+dir)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// Oras runs the oras binary in dir (where the files it pushes are, named relatively) with
// --plain-http, a registry config file of its own (so no credentials of the machine are
// read or written), and user's credentials given as flags (none when user is "").
// args are the command and its arguments, e.g. "push", REF, "model.bin:application/x".
// It returns oras's trimmed output.
func Oras(t testing.TB, dir, user, password string, args ...string) (string, error) {
	t.Helper()
	all := append([]string{}, args[0], "--plain-http", "--registry-config", filepath.Join(t.TempDir(), "config.json"))
	if user != "" {
		all = append(all, "--username", user, "--password", password)
	}
	all = append(all, args[1:]...)
	cmd := exec.CommandContext(t.Context(), Bin(t, "oras"), all...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir())
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}
