package e2e

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
)

// preheatRun is one run of `cove-cache preheat`.
type preheatRun struct {
	stdout, stderr string
	code           int
}

// preheatCmd builds `cove-cache preheat ARGS` with a HOME and DOCKER_CONFIG of its own
// (dockerConfig: a directory holding config.json, or "" for an empty one), so no
// credential of the machine is read.
func preheatCmd(t *testing.T, dockerConfig string, args ...string) *exec.Cmd {
	t.Helper()
	if dockerConfig == "" {
		dockerConfig = t.TempDir()
	}
	cmd := exec.CommandContext(t.Context(), peers.CoveBinary(t, "cove-cache"), append([]string{"preheat"}, args...)...)
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir(), "DOCKER_CONFIG="+dockerConfig, "REGISTRY_AUTH_FILE="+filepath.Join(dockerConfig, "none.json"))
	return cmd
}

func runPreheatCmd(t *testing.T, cmd *exec.Cmd, stdin string) preheatRun {
	t.Helper()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr, cmd.Stdin = &out, &errb, strings.NewReader(stdin)
	err := cmd.Run()
	var ee *exec.ExitError
	code := 0
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("cove-cache preheat: %v", err)
	}
	return preheatRun{stdout: out.String(), stderr: errb.String(), code: code}
}

func runPreheat(t *testing.T, args ...string) preheatRun {
	t.Helper()
	return runPreheatCmd(t, preheatCmd(t, "", args...), "")
}

func (r preheatRun) String() string {
	return fmt.Sprintf("exit %d\n--- stdout:\n%s--- stderr:\n%s", r.code, r.stdout, r.stderr)
}

// blobGETsDiff is the origin's blob GETs after a point (see peers.Registry.BlobGETs).
func blobGETsDiff(after, before map[string]int) map[string]int {
	d := map[string]int{}
	for k, v := range after {
		if v != before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}

// Preheat an image through a real cove-cache (output without a terminal: plain lines),
// then a fresh containerd pulls it through cove: the origin serves no blob.
func TestPreheatThenPullCostsNoOriginBlob(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 3, 1<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)

	r := runPreheat(t, "--cache", cove.URL, img.Ref)
	t.Logf("%s", r)
	if r.code != 0 || !strings.Contains(r.stdout, "preheated "+img.Ref+": "+img.Digest) {
		t.Fatalf("preheat: %s", r)
	}
	if !strings.Contains(r.stdout, "summary: 1 of 1 references preheated") {
		t.Fatalf("no summary: %s", r)
	}
	// Not a terminal: plain lines, one per blob, no bar drawn in place.
	if strings.ContainsAny(r.stderr, "\r\x1b") || strings.Count(r.stderr, "\nblob sha256:") != len(allBlobs(img)) {
		t.Fatalf("plain progress: want one line per blob and no control characters: %q", r.stderr)
	}
	got := origin.BlobGETs()
	for _, d := range allBlobs(img) {
		if got[d] != 1 {
			t.Fatalf("origin GETs of %s after preheat = %d, want 1", d, got[d])
		}
	}

	c := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := c.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, c, img)
	if d := blobGETsDiff(origin.BlobGETs(), got); len(d) > 0 {
		t.Fatalf("the pull after preheat made origin blob GETs: %v", d)
	}
	if hits := cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="hit"`); hits < float64(len(allBlobs(img))) {
		t.Fatalf("blob hits = %v, want at least %d", hits, len(allBlobs(img)))
	}
}

// Each reference that fails is named, with a non-zero exit, while the others are
// preheated: an unknown tag, and a registry cove-cache refuses to contact (a private
// address, outside its origin policy).
func TestPreheatNamesEachFailedReference(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 256<<10)
	other := peers.PushRandomImage(t, origin.Addr, "team/other:v1", 1, 256<<10)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)

	unknown := origin.Addr + "/team/app:nope"
	refused := "10.255.0.1:5000/team/app:v1"
	r := runPreheat(t, "--cache", cove.URL, img.Ref, unknown, refused, other.Ref)
	t.Logf("%s", r)
	if r.code != 1 {
		t.Fatalf("want exit 1: %s", r)
	}
	for _, ok := range []peers.Image{img, other} {
		if !strings.Contains(r.stdout, "preheated "+ok.Ref+": "+ok.Digest) {
			t.Fatalf("%s not preheated: %s", ok.Ref, r)
		}
	}
	for _, bad := range []string{unknown, refused} {
		if !strings.Contains(r.stdout, "FAILED "+bad+": ") || !strings.Contains(r.stderr, bad) {
			t.Fatalf("%s not named as failed: %s", bad, r)
		}
	}
	if !strings.Contains(r.stdout, "MANIFEST_UNKNOWN") {
		t.Fatalf("the unknown tag's error does not say so: %s", r)
	}
	if !strings.Contains(r.stderr, "2 of 4 references failed: "+unknown+", "+refused) {
		t.Fatalf("stderr does not name the failed references: %s", r)
	}
}

// Against an origin with token authentication: logins from a docker config file and
// from --user (password on stdin, and inline) preheat a tenant's images through
// cove-cache's token broker; without a login the same image is refused. A fresh
// containerd then pulls everything as that tenant with no origin blob GET. No password
// appears in preheat's output or cove-cache's log.
func TestPreheatTokenOriginWithLogins(t *testing.T) {
	ctx := testCtx(t)
	const pw = "team-a-secret-1x"
	origin := peers.StartTokenOrigin(t, map[string]string{"team-a": pw})
	imgs := []peers.Image{
		origin.Push(t, "team-a/app:v1", 2, 256<<10),
		origin.Push(t, "team-a/tool:v1", 2, 256<<10),
		origin.Push(t, "team-a/lib:v1", 2, 256<<10),
	}
	realmHost := strings.TrimPrefix(origin.Tokens.Realm, "http://")
	realmHost = realmHost[:strings.Index(realmHost, "/")]
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr, "--origin-allow", realmHost, "--log-level", "debug")
	var outputs strings.Builder

	anon := runPreheat(t, "--cache", cove.URL, imgs[0].Ref)
	outputs.WriteString(anon.String())
	if anon.code != 1 || !strings.Contains(anon.stderr, imgs[0].Ref) {
		t.Fatalf("anonymous preheat of a private image: want exit 1 naming it: %s", anon)
	}

	// docker login 127.0.0.1:PORT, as the docker config file holds it.
	dc := t.TempDir()
	conf, _ := json.Marshal(map[string]any{"auths": map[string]any{
		origin.Addr: map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte("team-a:" + pw))},
	}})
	if err := os.WriteFile(filepath.Join(dc, "config.json"), conf, 0o600); err != nil {
		t.Fatal(err)
	}
	runs := []preheatRun{
		runPreheatCmd(t, preheatCmd(t, dc, "--cache", cove.URL, imgs[0].Ref), ""),
		runPreheatCmd(t, preheatCmd(t, "", "--cache", cove.URL, "--user", "team-a", "--password-stdin", imgs[1].Ref), pw+"\n"),
		runPreheatCmd(t, preheatCmd(t, "", "--cache", cove.URL, "--user", origin.Addr+"/team-a:"+pw, imgs[2].Ref), ""),
	}
	for i, r := range runs {
		outputs.WriteString(r.String())
		if r.code != 0 || !strings.Contains(r.stdout, "preheated "+imgs[i].Ref) {
			t.Fatalf("preheat %d: %s", i, r)
		}
	}
	before := origin.BlobGETs()
	c := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	for _, img := range imgs {
		if err := c.Pull(ctx, img.Ref, "--user", "team-a:"+pw); err != nil {
			t.Fatal(err)
		}
		peers.CheckPulled(t, ctx, c, img)
	}
	if d := blobGETsDiff(origin.BlobGETs(), before); len(d) > 0 {
		t.Fatalf("pulls after preheat made origin blob GETs: %v", d)
	}

	logs, err := os.ReadFile(cove.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range []string{pw, base64.StdEncoding.EncodeToString([]byte("team-a:" + pw)),
		base64.StdEncoding.EncodeToString([]byte(origin.Addr + "/team-a:" + pw))} {
		if strings.Contains(outputs.String(), secret) {
			t.Errorf("preheat's output holds a secret %q", secret)
		}
		if bytes.Contains(logs, []byte(secret)) {
			t.Errorf("cove-cache's log holds a secret %q", secret)
		}
	}
}
