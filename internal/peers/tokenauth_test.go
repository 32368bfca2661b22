package peers

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

// The fixture against a real distribution v3 registry: the admin pushes, each user reads
// its own repositories and public/*, nothing else; a token for one repository does not
// open another.
func TestTokenServiceWithRegistry(t *testing.T) {
	t.Parallel()
	ts := StartTokenService(t, map[string]string{TokenAdmin: "admin-pw", "team-a": "a-pw", "team-b": "b-pw"})
	reg := StartRegistry(t, WithTokenAuth(ts))
	a := PushRandomImage(t, reg.Addr, "team-a/app:v1", 1, 4096, WithPushAuth(TokenAdmin, "admin-pw"))
	PushRandomImage(t, reg.Addr, "public/app:v1", 1, 4096, WithPushAuth(TokenAdmin, "admin-pw"))

	get := func(path, user, pw string) int {
		t.Helper()
		u := reg.URL + path
		resp, err := http.Head(u)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			return resp.StatusCode
		}
		tok, err := FetchToken(resp.Header.Get("WWW-Authenticate"), user, pw)
		if err != nil {
			t.Fatalf("%s as %q: %v", path, user, err)
		}
		req, _ := http.NewRequest(http.MethodHead, u, nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json")
		resp, err = http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, c := range []struct {
		path, user, pw string
		want           int
	}{
		{"/v2/team-a/app/manifests/v1", "team-a", "a-pw", 200},
		{"/v2/team-a/app/blobs/" + a.Layers[0], "team-a", "a-pw", 200},
		{"/v2/team-a/app/manifests/v1", "team-b", "b-pw", 401},
		{"/v2/team-a/app/manifests/v1", "", "", 401},
		{"/v2/public/app/manifests/v1", "", "", 200},
		{"/v2/public/app/manifests/v1", "team-b", "b-pw", 200},
		{"/v2/team-b/app/blobs/" + a.Layers[0], "team-b", "b-pw", 404},
	} {
		if got := get(c.path, c.user, c.pw); got != c.want {
			t.Errorf("HEAD %s as %q = %d, want %d", c.path, c.user, got, c.want)
		}
	}
	if _, err := FetchToken(`Bearer realm="`+ts.Realm+`",service="`+ts.Service+`"`, "team-a", "wrong"); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("wrong password: %v, want 401", err)
	}
}

func TestParseBearerChallenge(t *testing.T) {
	p, ok := ParseBearerChallenge(`Bearer realm="http://127.0.0.1:1/token",service="svc",scope="repository:a/b:pull,push",error="insufficient_scope"`)
	if !ok || p["realm"] != "http://127.0.0.1:1/token" || p["service"] != "svc" || p["scope"] != "repository:a/b:pull,push" || p["error"] != "insufficient_scope" {
		t.Fatalf("%v %v", p, ok)
	}
	if _, ok := ParseBearerChallenge(`Basic realm="x"`); ok {
		t.Fatal("Basic parsed as Bearer")
	}
}

// AcceptedFor: a token is good until its exp plus distribution's leeway, and the registry
// refuses it after, on a ranged blob GET as on any other (what a fill's later range
// requests meet).
func TestTokenServiceLifetime(t *testing.T) {
	t.Parallel()
	ts := StartTokenService(t, map[string]string{TokenAdmin: "admin-pw", "team-a": "a-pw"})
	const accepted = 2 * time.Second
	ts.AcceptedFor(accepted)
	reg := StartRegistry(t, WithTokenAuth(ts))
	a := PushRandomImage(t, reg.Addr, "team-a/app:v1", 1, 4096, WithPushAuth(TokenAdmin, "admin-pw"))
	u := reg.URL + "/v2/team-a/app/blobs/" + a.Layers[0]
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	tok, err := FetchToken(resp.Header.Get("WWW-Authenticate"), "team-a", "a-pw")
	if err != nil {
		t.Fatal(err)
	}
	issued := time.Now()
	ranged := func() (int, string) {
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		req.Header.Set("Range", "bytes=100-199")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		return resp.StatusCode, resp.Header.Get("WWW-Authenticate")
	}
	if st, _ := ranged(); st != http.StatusPartialContent {
		t.Fatalf("ranged GET with a fresh token: %d, want 206", st)
	}
	// exp has a granularity of a second: wait past it by one more.
	time.Sleep(time.Until(issued.Add(accepted + 1500*time.Millisecond)))
	st, challenge := ranged()
	if st != http.StatusUnauthorized {
		t.Fatalf("ranged GET with an expired token: %d, want 401", st)
	}
	t.Logf("expired token on a ranged blob GET: %d, WWW-Authenticate %q", st, challenge)
	if !strings.Contains(challenge, "Bearer realm=") {
		t.Fatalf("challenge %q is not a Bearer challenge", challenge)
	}
}
