package e2e

import (
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
)

// Multi-tenancy against an origin with Docker token authentication: each tenant pulls
// its own images through cove-node and cove-cache, nothing of another tenant's, even
// when everything is cached and the tenant talks to cove-cache directly; no credential
// appears in cove-cache's or cove-node's logs or metrics.
func TestTenancyTokenAuth(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartTokenOrigin(t, map[string]string{"team-a": "team-a-secret-1x", "team-b": "team-b-secret-2x"})
	ts, pw := origin.Tokens, origin.Passwords
	imgA := origin.Push(t, "team-a/app:v1", 2, 256<<10)
	imgB := origin.Push(t, "team-b/app:v1", 2, 256<<10)
	imgP := origin.Push(t, "public/app:v1", 2, 256<<10)
	big := origin.Push(t, "team-a/big:v1", 20, 64<<10)
	pushTokens := len(ts.Issued())

	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr, "--log-level", "debug")
	node := peers.StartCoveNode(t, []string{cove.URL}, "--origin-plain-http", origin.Addr, "--log-level", "debug")
	metricsText := map[string]string{}
	scrape := func(name, u string) {
		resp, err := http.Get(u + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		metricsText[name] += string(b)
	}
	user := func(u string) string { return u + ":" + pw[u] }

	// ctr as team-a: its own image, not team-b's.
	ca := peers.StartContainerd(t, peers.WithMirror(node.URL))
	if err := ca.Pull(ctx, imgA.Ref, "--user", user("team-a")); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, ca, imgA)
	if err := ca.Pull(ctx, imgB.Ref, "--user", user("team-a")); err == nil {
		t.Fatal("team-a pulled team-b's image by tag with ctr")
	}
	// crictl as team-b: its own image, not team-a's.
	cb := peers.StartContainerd(t, peers.WithMirror(node.URL))
	if err := cb.CrictlPullWith(ctx, imgB.Ref, "--creds", user("team-b")); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, cb, imgB)
	if err := cb.CrictlPullWith(ctx, imgA.Ref, "--creds", user("team-b")); err == nil {
		t.Fatal("team-b pulled team-a's image by tag with crictl")
	}
	// Anonymous: public only, both pull paths.
	cn := peers.StartContainerd(t, peers.WithMirror(node.URL))
	if err := cn.Pull(ctx, imgP.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, cn, imgP)
	if err := cn.CrictlPull(ctx, imgP.Ref); err != nil {
		t.Fatal(err)
	}
	if err := cn.Pull(ctx, imgA.Ref); err == nil {
		t.Fatal("anonymous ctr pull of team-a's image succeeded")
	}
	if err := cn.CrictlPull(ctx, imgB.Ref); err == nil {
		t.Fatal("anonymous crictl pull of team-b's image succeeded")
	}
	if n := cove.Metric(t, "cove_requests_total", `operation="blob"`); n < 6 {
		t.Fatalf("cove-cache saw %v blob requests: the pulls did not go through it", n)
	}
	if n := node.Metric(t, "cove_node_requests_total", `served_by="cache"`); n < 6 {
		t.Fatalf("cove-node served %v requests from the cache", n)
	}
	for _, i := range ts.Issued()[pushTokens:] {
		t.Logf("token request through the mirror: %s user=%q service=%q requested=%v granted=%v -> %d",
			i.Method, i.User, i.Service, i.Requested, i.Granted, i.Status)
	}

	// Everything is cached now. team-b asks cove-cache directly, doing the token dance
	// itself through cove-cache's relayed challenge, and asks the origin the same
	// questions with the same token: the answers must match and be refusals.
	ns := "?ns=" + url.QueryEscape(origin.Addr)
	ownToken := ""
	ask := func(base, path, token string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, base+path, nil)
		req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json")
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, resp.Header.Get("WWW-Authenticate")
	}
	for _, c := range []struct{ name, path string }{
		{"team-a manifest by tag", "/v2/team-a/app/manifests/v1"},
		{"team-a manifest by digest", "/v2/team-a/app/manifests/" + imgA.Digest},
		{"team-a layer by digest", "/v2/team-a/app/blobs/" + imgA.Layers[0]},
		{"team-a layer through team-b's repository", "/v2/team-b/app/blobs/" + imgA.Layers[0]},
		{"team-a config through team-b's repository", "/v2/team-b/app/blobs/" + imgA.Config},
		{"team-a manifest through team-b's repository", "/v2/team-b/app/manifests/" + imgA.Digest},
	} {
		st, challenge := ask(cove.URL, c.path+ns, "")
		if st != http.StatusUnauthorized {
			t.Fatalf("%s: anonymous request to cove-cache answered %d, want 401", c.name, st)
		}
		tok, err := peers.FetchToken(challenge, "team-b", pw["team-b"])
		if err != nil {
			t.Fatalf("%s: token through cove-cache's challenge %q: %v", c.name, challenge, err)
		}
		if ownToken == "" {
			// A token for team-b's own repository too, tried against every path.
			ownToken, err = peers.FetchToken(strings.Replace(challenge, "team-a/app", "team-b/app", 1), "team-b", pw["team-b"])
			if err != nil {
				t.Fatal(err)
			}
		}
		for _, tk := range []struct{ what, token string }{{"challenge token", tok}, {"own-repo token", ownToken}} {
			viaCove, _ := ask(cove.URL, c.path+ns, tk.token)
			atOrigin, _ := ask(origin.URL, c.path, tk.token)
			t.Logf("%s (%s): cove-cache %d, origin %d", c.name, tk.what, viaCove, atOrigin)
			if viaCove != atOrigin {
				t.Errorf("%s (%s): cove-cache answered %d, the origin %d", c.name, tk.what, viaCove, atOrigin)
			}
			if viaCove != 401 && viaCove != 403 && viaCove != 404 {
				t.Errorf("%s (%s): cove-cache answered %d, want a refusal", c.name, tk.what, viaCove)
			}
		}
	}

	// A 20-layer image, warm in cove-cache, pulled by its tenant: how many
	// authorization checks (HEADs) reach the origin.
	warm := peers.StartContainerd(t, peers.WithMirror(node.URL))
	if err := warm.Pull(ctx, big.Ref, "--user", user("team-a")); err != nil {
		t.Fatal(err)
	}
	before := len(origin.Requests())
	tokensBefore := len(ts.Issued())
	checksBefore := cove.Metric(t, "cove_authz_checks_total")
	fresh := peers.StartContainerd(t, peers.WithMirror(node.URL))
	if err := fresh.Pull(ctx, big.Ref, "--user", user("team-a")); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, fresh, big)
	heads, gets, other := 0, 0, 0
	for _, r := range origin.Requests()[before:] {
		switch r.Method {
		case http.MethodHead:
			heads++
		case http.MethodGet:
			gets++
		default:
			other++
		}
	}
	var seen []string
	for _, r := range origin.Requests()[before:] {
		seen = append(seen, fmt.Sprintf("%s %s %d", r.Method, r.Path, r.Status))
	}
	t.Logf("origin requests during the warm pull:\n  %s", strings.Join(seen, "\n  "))
	blobs := len(allBlobs(big))
	t.Logf("warm pull of a %d-layer image (%d blobs + manifest): origin saw %d HEAD (authorization checks), %d GET, %d other; cove_authz_checks_total +%v; %d token requests",
		len(big.Layers), blobs, heads, gets, other, cove.Metric(t, "cove_authz_checks_total")-checksBefore, len(ts.Issued())-tokensBefore)
	if gets != 0 {
		t.Errorf("the warm pull made %d GETs at the origin", gets)
	}
	if heads >= 3*len(big.Layers) {
		t.Errorf("%d authorization checks for %d layers", heads, len(big.Layers))
	}
	if f := node.Metric(t, "cove_node_requests_total", `served_by="origin"`) + node.Metric(t, "cove_node_requests_total", `served_by="handoff"`); f != 0 {
		t.Logf("cove-node fell back %v times over the whole test", f)
	}

	// No credential in logs or metrics.
	scrape("cove-cache", cove.URL)
	scrape("cove-node", node.URL)
	cove.Stop()
	node.Stop()
	texts := map[string]string{"cove-cache metrics": metricsText["cove-cache"], "cove-node metrics": metricsText["cove-node"]}
	for name, path := range map[string]string{"cove-cache log": cove.LogPath, "cove-node log": node.LogPath} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		texts[name] = string(b)
	}
	var secrets []string
	for u, p := range pw {
		secrets = append(secrets, p, base64.StdEncoding.EncodeToString([]byte(u+":"+p)))
	}
	tokens := ts.Tokens()
	for _, tok := range tokens {
		parts := strings.Split(tok, ".")
		secrets = append(secrets, tok, parts[1], parts[2]) // claims and signature are per token
	}
	for name, text := range texts {
		if len(text) == 0 {
			t.Errorf("%s is empty", name)
		}
		for _, s := range secrets {
			if strings.Contains(text, s) {
				t.Errorf("%s contains a credential (%s...)", name, s[:8])
			}
		}
		for _, marker := range []string{"Bearer ey", "Basic dGVh", "Basic YWRt"} {
			if strings.Contains(text, marker) {
				t.Errorf("%s contains an Authorization value (%q)", name, marker)
			}
		}
	}
	t.Logf("checked %d secrets (%d tokens) against %d log/metrics texts", len(secrets), len(tokens), len(texts))
}

// crane, which cannot send ns=, through the cove-cache binary to a token-authenticated
// origin serving as the default registry: cove-cache is crane's token service, fetching
// the origin's tokens for crane's scopes (see docs/security.md). Each tenant pulls its
// own image and not the other's; the origin's token realm (on loopback here) is
// contacted only because --origin-allow names it.
func TestCraneThroughTokenBroker(t *testing.T) {
	origin := peers.StartTokenOrigin(t, map[string]string{"team-a": "team-a-secret-1x", "team-b": "team-b-secret-2x"})
	imgA := origin.Push(t, "team-a/app:v1", 2, 256<<10)
	imgB := origin.Push(t, "team-b/app:v1", 2, 256<<10)
	pushed := len(origin.Tokens.Issued())
	realmHost := strings.TrimPrefix(origin.Tokens.Realm, "http://")
	realmHost = realmHost[:strings.Index(realmHost, "/")]
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr, "--default-registry", origin.Addr, "--origin-allow", realmHost)
	host := strings.TrimPrefix(cove.URL, "http://")
	pull := func(user string, img peers.Image, repo string) error {
		_, err := peers.Crane(t, host, user, origin.Passwords[user], "pull", "--format", "oci", host+"/"+repo+":v1", t.TempDir())
		if err != nil {
			return err
		}
		got, err := peers.Crane(t, host, user, origin.Passwords[user], "digest", host+"/"+repo+":v1")
		if err == nil && got != img.Digest {
			t.Fatalf("crane digest %s as %s: %s, want %s", repo, user, got, img.Digest)
		}
		return err
	}
	for round := range 2 { // cold, then warm
		if err := pull("team-a", imgA, "team-a/app"); err != nil {
			t.Fatalf("round %d: team-a pulling its own image: %v", round, err)
		}
		if err := pull("team-b", imgB, "team-b/app"); err != nil {
			t.Fatalf("round %d: team-b pulling its own image: %v", round, err)
		}
		if pull("team-b", imgA, "team-a/app") == nil || pull("", imgA, "team-a/app") == nil {
			t.Fatalf("round %d: team-a's image pulled by team-b or anonymously", round)
		}
	}
	if n := cove.Metric(t, "cove_requests_total", `operation="token"`); n == 0 {
		t.Fatal("cove-cache's token endpoint was not used")
	}
	if n := cove.Metric(t, "cove_requests_total", `operation="blob",result="hit"`); n < 3 {
		t.Fatalf("%v blob hits: the warm round was not served from the cache", n)
	}
	if n := len(origin.Tokens.Issued()) - pushed; n == 0 {
		t.Fatal("no token request reached the origin's token service")
	}
}
