package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/internal/peers"
)

// originGet GETs path at the origin with a token of its token service for scope (as
// TokenAdmin) and returns the body's digest and the body.
func originGet(t *testing.T, o *peers.TokenOrigin, scope, path string) (string, []byte) {
	t.Helper()
	tok, err := peers.FetchToken(`Bearer realm="`+o.Tokens.Realm+`",service="`+o.Tokens.Service+`",scope="`+scope+`"`, peers.TokenAdmin, o.Passwords[peers.TokenAdmin])
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(http.MethodGet, o.URL+path, nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s at the origin: %d %v", path, resp.StatusCode, err)
	}
	sum := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(sum[:]), b
}

// `ctr image push` through cove-cache (containerd's hosts.toml mirror with the push
// capability: every request carries ?ns=<origin>), with the tenant's own credentials
// answering the token-authenticated origin's own challenges. The origin holds the image
// byte-identical, and a fresh containerd pulling it through cove-cache costs the origin
// no blob GET: the push was kept on the way.
func TestCtrPushThroughCache(t *testing.T) {
	ctx := testCtx(t)
	src := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, src.Addr, "src/app:v1", 3, 2<<20)
	o := peers.StartTokenOrigin(t, map[string]string{"team-a": "team-a-secret-1x"})
	cove := peers.StartCove(t, "", "--origin-plain-http", o.Addr, "--origin-plain-http", src.Addr)
	user := "team-a:" + o.Passwords["team-a"]

	builder := peers.StartContainerd(t, peers.WithPushMirror(cove.URL))
	if err := builder.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	target := o.Addr + "/team-a/app:v1"
	if err := builder.Tag(ctx, img.Ref, target); err != nil {
		t.Fatal(err)
	}
	if _, err := builder.Push(ctx, target, "--user", user); err != nil {
		t.Fatal(err)
	}
	if n := cove.Metric(t, "cove_requests_total", `operation="upload"`, `result="passthrough"`); n < float64(len(allBlobs(img))) {
		t.Fatalf("%v upload requests went through cove-cache: the push did not", n)
	}

	// The origin holds the image, byte-identical.
	d, body := originGet(t, o, "repository:team-a/app:pull", "/v2/team-a/app/manifests/v1")
	if d != img.Digest {
		t.Fatalf("the origin's team-a/app:v1 is %s, pushed %s", d, img.Digest)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(body, &m); err != nil {
		t.Fatal(err)
	}
	for _, b := range append([]ocispec.Descriptor{m.Config}, m.Layers...) {
		if got, _ := originGet(t, o, "repository:team-a/app:pull", "/v2/team-a/app/blobs/"+b.Digest.String()); got != b.Digest.String() {
			t.Fatalf("the origin's %s reads back as %s", b.Digest, got)
		}
	}

	// A fresh containerd pulls it through cove-cache: zero origin blob GETs.
	before := len(o.Requests())
	fresh := peers.StartContainerd(t, peers.WithMirror(cove.URL))
	if err := fresh.Pull(ctx, target, "--user", user); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, fresh, peers.Image{Ref: target, Digest: img.Digest})
	for _, q := range o.Requests()[before:] {
		if q.Method == http.MethodGet && strings.Contains(q.Path, "/blobs/") {
			t.Errorf("the pull of the pushed image fetched %s from the origin", q.Path)
		}
	}
	if hits := cove.Metric(t, "cove_requests_total", `operation="blob"`, `result="hit"`); hits < float64(len(allBlobs(img))) {
		t.Fatalf("blob hits = %v, want at least %d", hits, len(allBlobs(img)))
	}
}
