package server_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/server"
)

// imageTarball writes a random image (layers of size bytes) as a crane tarball: an image
// no origin of the test holds yet.
func imageTarball(t *testing.T, layers int, size int64) string {
	t.Helper()
	src := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, src.Addr, "src/app:v1", layers, size)
	tar := filepath.Join(t.TempDir(), "image.tar")
	if out, err := peers.Crane(t, src.Addr, "", "", "pull", img.Ref, tar); err != nil {
		t.Fatalf("crane pull %s: %v: %s", img.Ref, err, out)
	}
	src.Stop()
	return tar
}

// originHolds checks, straight at the origin as its admin, that repo:tag is the manifest
// d and that it and every blob it names read back with their digests; it returns the
// blobs' digests.
func originHolds(t *testing.T, o *peers.TokenOrigin, repo, tag, d string) []string {
	t.Helper()
	hdr := tokenHeader(t, o, peers.TokenAdmin, "repository:"+repo+":pull")
	_, body := mustGet(t, o.URL+"/v2/"+repo+"/manifests/"+tag, hdr, 200)
	if sha(body) != d {
		t.Fatalf("the origin's %s:%s is %s, pushed %s", repo, tag, sha(body), d)
	}
	var m ocispec.Manifest
	if err := json.Unmarshal(body, &m); err != nil || m.Config.Digest == "" {
		t.Fatalf("the origin's %s:%s is no image manifest: %v", repo, tag, err)
	}
	blobs := []string{m.Config.Digest.String()}
	for _, l := range m.Layers {
		blobs = append(blobs, l.Digest.String())
	}
	for _, b := range blobs {
		if _, got := mustGet(t, o.URL+"/v2/"+repo+"/blobs/"+b, hdr, 200); sha(got) != b {
			t.Fatalf("the origin's blob %s reads back as %s", b, sha(got))
		}
	}
	return blobs
}

// pushedDigest is the digest of crane push's output (REF@sha256:...).
func pushedDigest(t *testing.T, out string) string {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	_, d, ok := strings.Cut(lines[len(lines)-1], "@")
	if !ok {
		t.Fatalf("crane push printed no digest: %s", out)
	}
	return d
}

// crane push through cove-cache to a token-authenticated origin, naming the registry in
// the path and through the default registry, logged in with cove-cache's token broker
// (logins bound to the registry): the origin holds the image byte-identical, its token
// service was asked for push scopes in its own naming, and a fresh containerd pulling
// the image through cove-cache costs the origin no blob GET.
func TestCranePushThroughCache(t *testing.T) {
	o := peers.StartTokenOrigin(t, tenantPasswords)
	var logs syncBuffer
	c := newAliasedCache(t, "registry.test", o.Addr, func(cfg *server.Config) {
		cfg.DefaultRegistry = "registry.test"
		debugLogs(&logs)(cfg)
	})
	host := strings.TrimPrefix(c.http.URL, "http://")
	// A push without credentials gets cove-cache's challenge asking for push.
	resp, body := send(t, http.MethodPost, c.http.URL+"/v2/registry.test/team-a/pushed/blobs/uploads/", nil, nil)
	expect(t, "anonymous POST", resp, body, http.StatusUnauthorized)
	if ch := resp.Header.Get("Www-Authenticate"); !strings.Contains(ch, c.http.URL+"/token") || !strings.Contains(ch, `scope="repository:registry.test/team-a/pushed:pull,push"`) {
		t.Fatalf("challenge to a push: %s", ch)
	}
	// A login bound to registry.test pushing to another registry: refused (401
	// invalid_token) before anything is sent.
	login := "Basic " + base64.StdEncoding.EncodeToString([]byte("registry.test/team-a:"+tenantPasswords["team-a"]))
	resp, body = send(t, http.MethodPost, c.http.URL+"/v2/other.test/team-a/pushed/blobs/uploads/", nil, map[string]string{"Authorization": login})
	expect(t, "a push to another registry with a bound login", resp, body, http.StatusUnauthorized)
	if !strings.Contains(resp.Header.Get("Www-Authenticate"), "invalid_token") {
		t.Fatalf("challenge %q", resp.Header.Get("Www-Authenticate"))
	}
	tar := imageTarball(t, 3, 256<<10)
	issued := len(o.Tokens.Issued())

	for _, tc := range []struct{ name, user, ref, repo string }{
		{"path prefix", "registry.test/team-a", host + "/registry.test/team-a/pushed:v1", "team-a/pushed"},
		{"default registry", "team-a", host + "/team-a/pushed-default:v1", "team-a/pushed-default"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := peers.Crane(t, host, tc.user, tenantPasswords["team-a"], "push", tar, tc.ref)
			if err != nil {
				t.Fatalf("crane push %s through the cache: %v: %s", tc.ref, err, out)
			}
			d := pushedDigest(t, out)
			blobs := originHolds(t, o, tc.repo, "v1", d)
			c.settle(t)
			for _, b := range append(blobs, d) {
				if _, err := c.store.Stat(t.Context(), digest.Digest(b)); err != nil {
					t.Fatalf("%s was not kept on the way: %v", b, err)
				}
			}
			// Pulled back through the cache by another client (crane, by tag): no blob
			// comes from the origin.
			before := o.BlobGETs()
			if out, err := peers.Crane(t, host, tc.user, tenantPasswords["team-a"], "pull", "--format", "oci", tc.ref, t.TempDir()); err != nil {
				t.Fatalf("crane pull through the cache: %v: %s", err, out)
			}
			after := o.BlobGETs()
			for _, b := range blobs {
				if after[b] != before[b] {
					t.Errorf("blob %s pulled through the cache was fetched from the origin", b)
				}
			}
		})
	}
	// The origin's token service was asked for push in its own naming, by team-a.
	var push bool
	for _, i := range o.Tokens.Issued()[issued:] {
		for _, sc := range i.Granted {
			if strings.HasPrefix(sc, "repository:team-a/pushed") && strings.Contains(sc, "push") && i.User == "team-a" {
				push = true
			}
			if strings.Contains(sc, "registry.test") {
				t.Fatalf("the origin's token service was asked in the client's naming: %v", i.Requested)
			}
		}
	}
	if n := testutil.ToFloat64(c.srv.Metrics().Requests.WithLabelValues("upload", "passthrough")); n < 4 {
		t.Fatalf("%v upload requests went through the cache", n)
	}
	if !push {
		t.Fatal("no push scope was brokered to the origin's token service")
	}

	// A fresh containerd pulls the pushed image through the cache (ns=): zero origin
	// blob GETs, the content intact.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ctrd := peers.StartContainerd(t, peers.WithMirror(c.http.URL))
	before := len(o.Requests())
	ref := "registry.test/team-a/pushed:v1"
	if err := ctrd.Pull(ctx, ref, "--user", "team-a:"+tenantPasswords["team-a"]); err != nil {
		t.Fatalf("containerd pull through the cache: %s", ctrError(err))
	}
	if err := ctrd.ReadAllContent(ctx, ref); err != nil {
		t.Fatal(err)
	}
	var blobGETs []string
	for _, q := range o.Requests()[before:] {
		if q.Method == "GET" && strings.Contains(q.Path, "/blobs/") {
			blobGETs = append(blobGETs, q.Path)
		}
	}
	if len(blobGETs) != 0 {
		t.Fatalf("containerd's pull of the pushed image cost %d origin blob GETs: %v", len(blobGETs), blobGETs)
	}
	assertNoSecrets(t, c, &logs, o.Tokens.Tokens(), o.Passwords)
	// Neither the origin's upload state nor a handle is logged.
	if !strings.Contains(logs.String(), "/blobs/uploads/<handle>") {
		t.Fatal("the debug log did not record the uploads")
	}
	if m := regexp.MustCompile(`_state|/blobs/uploads/[A-Za-z0-9_-]+`).FindString(logs.String()); m != "" {
		t.Fatalf("upload state in the log: %q", m)
	}
}
