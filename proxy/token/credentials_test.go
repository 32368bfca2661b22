package token

import (
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"

	"github.com/cove-oci/cove/proxy/route"
)

func basic(userpass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(userpass))
}

func TestBindLogin(t *testing.T) {
	for _, tc := range []struct {
		name, defaultRegistry, header string
		ok                            bool
		registry, user, sent, err     string
	}{
		{name: "plain user: default registry", defaultRegistry: "registry.test", header: basic("alice:pw"), ok: true, registry: "registry.test", user: "alice", sent: "alice:pw"},
		{name: "plain user, no default: Docker Hub", header: basic("alice:pw"), ok: true, registry: route.DockerHub, user: "alice", sent: "alice:pw"},
		{name: "registry in the user name", defaultRegistry: "registry.test", header: basic("ghcr.io/alice:pw"), ok: true, registry: "ghcr.io", user: "alice", sent: "alice:pw"},
		{name: "host and port, case folded", header: basic("Reg.Example:5000/alice:p:w"), ok: true, registry: "reg.example:5000", user: "alice", sent: "alice:p:w"},
		{name: "localhost", header: basic("localhost/bob:pw"), ok: true, registry: "localhost", user: "bob", sent: "bob:pw"},
		{name: "Docker Hub alias", header: basic("index.docker.io/bob:pw"), ok: true, registry: route.DockerHub, user: "bob", sent: "bob:pw"},
		{name: "only the first element is a registry", header: basic("ghcr.io/a.b/c:pw"), ok: true, registry: "ghcr.io", user: "a.b/c", sent: "a.b/c:pw"},
		{name: "a slash in a plain user name", defaultRegistry: "registry.test", header: basic("team/alice:pw"), ok: true, registry: "registry.test", user: "team/alice", sent: "team/alice:pw"},
		{name: "bearer is no login", header: "Bearer abc", ok: false},
		{name: "none", header: "", ok: false},
		{name: "empty user and password: anonymous", header: basic(":"), ok: false},
		{name: "empty user with a password", header: basic(":pw"), ok: true, err: "empty user name"},
		{name: "undecodable", header: "Basic !!!", ok: true, err: "malformed Basic credential"},
		{name: "no colon", header: basic("alice"), ok: true, err: "malformed Basic credential"},
		{name: "empty user after the registry", header: basic("ghcr.io/:pw"), ok: true, err: "empty user name"},
		{name: "invalid registry", header: basic("bad..host/alice:pw"), ok: true, err: "invalid registry host"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, ok, err := bindLogin(route.Router{DefaultRegistry: tc.defaultRegistry}, tc.header)
			if ok != tc.ok {
				t.Fatalf("ok = %v, want %v", ok, tc.ok)
			}
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				if strings.Contains(err.Error(), "pw") {
					t.Fatalf("error %q shows the password", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !ok {
				return
			}
			if l.registry != tc.registry || l.user != tc.user || l.authorization != basic(tc.sent) {
				t.Fatalf("bound %+v, want registry %q user %q sending %q", l, tc.registry, tc.user, tc.sent)
			}
		})
	}
}

func TestBindOriginTokens(t *testing.T) {
	out, err := bindOriginTokens("registry.test", []byte(`{"token":"eyJ.a.b","access_token":"eyJ.a.b","expires_in":300,"refresh_token":"r"}`))
	if err != nil {
		t.Fatal(err)
	}
	var answer map[string]any
	if err := json.Unmarshal(out, &answer); err != nil {
		t.Fatal(err)
	}
	if _, ok := answer["refresh_token"]; ok || answer["expires_in"] != 300.0 {
		t.Fatalf("answer %s", out)
	}
	for _, k := range []string{"token", "access_token"} {
		v, _ := answer[k].(string)
		tok, ok, err := decodeCoveToken(map[string][]string{"Authorization": {"Bearer " + v}})
		if !ok || err != nil || tok != (coveToken{Registry: "registry.test", Authorization: "Bearer eyJ.a.b"}) {
			t.Fatalf("%s = %q: %+v %v %v", k, v, tok, ok, err)
		}
	}
	for _, bad := range []string{`[]`, `{}`, `{"token":""}`, `{"token":7}`, `{"token":"a b"}`, `{"token":"cove1.x"}`, `{"token":"a\nb"}`} {
		if _, err := bindOriginTokens("registry.test", []byte(bad)); err == nil {
			t.Errorf("%s: accepted", bad)
		}
	}
}
