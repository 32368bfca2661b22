package server_test

// Attack tests, hole 2: the token broker sends one registry's credential to another. A
// Basic credential given to cove-cache's /token is bound to one registry (user
// "<registry-host>/<user>" to that host, a plain "<user>" to the default registry); a
// scope naming another registry is refused (401/403) with nothing sent anywhere, and a
// token cove-cache hands out works only with the registry it was issued for.

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/origin"
	"github.com/cove-oci/cove/proxy/server"
)

// hostileRegistry stands for a registry under the attacker's control: it answers every
// request 401 with its challenge and records what it was sent.
type hostileRegistry struct {
	addr string
	mu   sync.Mutex
	seen []hostileRequest
}

type hostileRequest struct{ method, uri, authorization string }

func startHostile(t *testing.T, challenge string) *hostileRegistry {
	h := &hostileRegistry{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.mu.Lock()
		h.seen = append(h.seen, hostileRequest{r.Method, r.URL.RequestURI(), r.Header.Get("Authorization")})
		h.mu.Unlock()
		w.Header().Set("Www-Authenticate", challenge)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	t.Cleanup(srv.Close)
	h.addr = strings.TrimPrefix(srv.URL, "http://")
	return h
}

func (h *hostileRegistry) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.seen)
}

func (h *hostileRegistry) since(n int) []hostileRequest {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]hostileRequest(nil), h.seen[n:]...)
}

// newAliasesCache is newAliasedCache for several port-less names (alias -> HOST:PORT on
// loopback), all over plain HTTP, with localhost (the token service's realm) allowed.
func newAliasesCache(t *testing.T, aliases map[string]string, configure func(*server.Config)) *cache {
	t.Helper()
	tr := origin.NewTransport()
	dialer := &net.Dialer{}
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if host, ok := strings.CutSuffix(addr, ":80"); ok && aliases[host] != "" {
			addr = aliases[host]
		}
		return dialer.DialContext(ctx, network, addr)
	}
	allow := []string{"localhost"}
	var plain []string
	for a := range aliases {
		allow, plain = append(allow, a), append(plain, a)
	}
	return newCacheWith(t, func(cfg *server.Config) {
		cfg.Transport = tr
		cfg.OriginPolicy = origin.PolicyConfig{
			Allow: allow,
			Resolve: func(_ context.Context, host string) ([]netip.Addr, error) {
				if host == "localhost" || aliases[host] != "" {
					return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
				}
				return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
			},
		}
		if configure != nil {
			configure(cfg)
		}
	}, plain...)
}

func defaultRegistryTest(cfg *server.Config) { cfg.DefaultRegistry = "registry.test" }

// credentialed lists the token service's answers, after the first n, to requests that
// carried credentials.
func credentialed(ts *peers.TokenService, n int) []peers.TokenIssue {
	var out []peers.TokenIssue
	for _, i := range ts.Issued()[n:] {
		if i.User != "" {
			out = append(out, i)
		}
	}
	return out
}

// (a) A credential for registry.test (the default registry, or named in the user) asking
// cove-cache's /token for a scope of evil.test is refused, and nobody is sent anything.
func TestAttackTokenScopeOfAnotherRegistry(t *testing.T) {
	o := peers.StartTokenOrigin(t, tenantPasswords)
	o.Push(t, "team-a/app:v1", 1, 4096)
	e := startHostile(t, `Bearer realm="http://evil.test/token",service="evil"`)
	c := newAliasesCache(t, map[string]string{"registry.test": o.Addr, "evil.test": e.addr}, defaultRegistryTest)
	for _, user := range []string{"team-a", "registry.test/team-a"} {
		t.Run(strings.ReplaceAll(user, "/", "_"), func(t *testing.T) {
			issued, seen := len(o.Tokens.Issued()), e.count()
			resp, body, err := doBasic(t, c.http.URL+"/token?scope=repository:evil.test/x:pull&service=cove", user, tenantPasswords["team-a"])
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusForbidden {
				t.Errorf("token for evil.test with a registry.test credential: %d %.200s, want 401 or 403", resp.StatusCode, body)
			}
			for _, r := range e.since(seen) {
				t.Errorf("evil.test received %s %s (Authorization %q)", r.method, r.uri, cut(r.authorization))
			}
			for _, i := range credentialed(o.Tokens, issued) {
				t.Errorf("registry.test's token service was asked as %q for %v (status %d)", i.User, i.Requested, i.Status)
			}
			// Control: the credential still works for its own registry.
			if resp, body, _ := doBasic(t, c.http.URL+"/token?scope=repository:registry.test/team-a/app:pull&service=cove", user, tenantPasswords["team-a"]); resp.StatusCode != 200 {
				t.Errorf("control: token for registry.test/team-a/app as %q: %d %.200s", user, resp.StatusCode, body)
			}
		})
	}
}

// (b) evil.test names registry.test's token service as its realm. A user logged in for
// registry.test pulls cove/evil.test/team-a/app with crane: refused, registry.test's
// token service issues nothing for it, and evil.test never sees an Authorization header.
func TestAttackHostileRealmIsOriginTokenService(t *testing.T) {
	o := peers.StartTokenOrigin(t, tenantPasswords)
	o.Push(t, "team-a/app:v1", 1, 4096)
	e := startHostile(t, `Bearer realm="`+o.Tokens.Realm+`",service="`+o.Tokens.Service+`"`)
	var logs syncBuffer
	c := newAliasesCache(t, map[string]string{"registry.test": o.Addr, "evil.test": e.addr}, func(cfg *server.Config) {
		defaultRegistryTest(cfg)
		debugLogs(&logs)(cfg)
	})
	defer func() {
		assertNoSecrets(t, c, &logs, o.Tokens.Tokens(), map[string]string{
			"team-a": tenantPasswords["team-a"], "registry.test/team-a": tenantPasswords["team-a"],
		})
	}()
	host := strings.TrimPrefix(c.http.URL, "http://")
	for _, user := range []string{"team-a", "registry.test/team-a"} {
		t.Run(strings.ReplaceAll(user, "/", "_"), func(t *testing.T) {
			issued, seen := len(o.Tokens.Issued()), e.count()
			if out, err := crane(t, c, user, tenantPasswords["team-a"], "pull", "--format", "oci", host+"/evil.test/team-a/app:v1", t.TempDir()); err == nil {
				t.Errorf("crane pull from evil.test with a registry.test login succeeded: %s", out)
			}
			for _, i := range credentialed(o.Tokens, issued) {
				if i.Status == 200 {
					t.Errorf("registry.test's token service issued %q a token granting %v for a pull from evil.test", i.User, i.Granted)
				}
			}
			for _, r := range e.since(seen) {
				if r.authorization == "" {
					continue
				}
				t.Errorf("evil.test received %s %s with Authorization %q", r.method, r.uri, cut(r.authorization))
				if tok, ok := strings.CutPrefix(r.authorization, "Bearer "); ok {
					if resp, _, _ := do(t, http.MethodGet, o.URL+"/v2/team-a/app/manifests/v1", map[string]string{"Authorization": "Bearer " + tok, "Accept": acceptManifests}); resp.StatusCode == 200 {
						t.Errorf("... and with it evil.test reads team-a/app at registry.test")
					}
				}
			}
			// Control: the same login pulls from registry.test.
			if out, err := crane(t, c, user, tenantPasswords["team-a"], "digest", host+"/registry.test/team-a/app:v1"); err != nil {
				t.Errorf("control: crane digest registry.test/team-a/app:v1 as %q: %v: %s", user, err, out)
			}
		})
	}
}

// (c) A token cove-cache handed out for one registry (an origin's JWT for registry.test,
// a cove1. token for the Basic origin basic.test), presented for evil.test, gets 401
// invalid_token, and evil.test sees nothing.
func TestAttackTokenUsedForAnotherRegistry(t *testing.T) {
	o := peers.StartTokenOrigin(t, tenantPasswords)
	o.Push(t, "team-a/app:v1", 1, 4096)
	basic := peers.StartRegistry(t, peers.WithHtpasswd("alice", "alice-secret-3x"))
	peers.PushRandomImage(t, basic.Addr, "team/app:v1", 1, 4096, peers.WithPushAuth("alice", "alice-secret-3x"))
	e := startHostile(t, `Bearer realm="http://evil.test/token",service="evil"`)
	var logs syncBuffer
	c := newAliasesCache(t, map[string]string{"registry.test": o.Addr, "basic.test": basic.Addr, "evil.test": e.addr}, func(cfg *server.Config) {
		defaultRegistryTest(cfg)
		debugLogs(&logs)(cfg)
	})
	var handedOut []string
	defer func() {
		assertNoSecrets(t, c, &logs, append(handedOut, o.Tokens.Tokens()...), map[string]string{
			"team-a": tenantPasswords["team-a"], "alice": "alice-secret-3x", "basic.test/alice": "alice-secret-3x",
		})
	}()

	for _, tc := range []struct{ kind, registry, repo, user, password string }{
		{"origin token", "registry.test", "team-a/app", "team-a", tenantPasswords["team-a"]},
		{"cove1 token", "basic.test", "team/app", "basic.test/alice", "alice-secret-3x"},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			resp, body, _ := doBasic(t, c.http.URL+"/token?service=cove&scope=repository:"+tc.registry+"/"+tc.repo+":pull", tc.user, tc.password)
			var tok struct{ Token string }
			if resp.StatusCode != 200 || json.Unmarshal(body, &tok) != nil || tok.Token == "" {
				t.Fatalf("token for %s: %d %s", tc.registry, resp.StatusCode, body)
			}
			handedOut = append(handedOut, tok.Token)
			bearer := map[string]string{"Authorization": "Bearer " + tok.Token, "Accept": acceptManifests}
			mustGet(t, c.http.URL+"/v2/"+tc.registry+"/"+tc.repo+"/manifests/v1", bearer, 200) // control
			seen := e.count()
			for _, u := range []string{
				c.http.URL + "/v2/evil.test/" + tc.repo + "/manifests/v1",
				c.http.URL + "/v2/evil.test/" + tc.repo + "/blobs/sha256:" + strings.Repeat("0", 64),
				c.url("evil.test", "/v2/"+tc.repo+"/manifests/v1"),
			} {
				resp, _, err := do(t, http.MethodGet, u, bearer)
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("Www-Authenticate"), `error="invalid_token"`) {
					t.Errorf("%s for %s used at %s: %d %q, want 401 invalid_token", tc.kind, tc.registry, u, resp.StatusCode, resp.Header.Get("Www-Authenticate"))
				}
			}
			for _, r := range e.since(seen) {
				t.Errorf("evil.test received %s %s (Authorization %q)", r.method, r.uri, cut(r.authorization))
			}
		})
	}
}

// (d) A client sends its login directly (no token) on a pull naming evil.test: refused
// with 401, evil.test sees nothing; for its own registry the login works, the registry
// taken off the user name.
func TestAttackLoginSentDirectlyForAnotherRegistry(t *testing.T) {
	o := peers.StartTokenOrigin(t, tenantPasswords)
	o.Push(t, "team-a/app:v1", 1, 4096)
	basic := peers.StartRegistry(t, peers.WithHtpasswd("alice", "alice-secret-3x"))
	peers.PushRandomImage(t, basic.Addr, "team/app:v1", 1, 4096, peers.WithPushAuth("alice", "alice-secret-3x"))
	e := startHostile(t, `Basic realm="evil"`)
	c := newAliasesCache(t, map[string]string{"registry.test": o.Addr, "basic.test": basic.Addr, "evil.test": e.addr}, defaultRegistryTest)
	for _, user := range []string{"team-a", "registry.test/team-a", "basic.test/alice"} {
		seen := e.count()
		resp, body, err := doBasic(t, c.http.URL+"/v2/evil.test/team-a/app/manifests/v1", user, tenantPasswords["team-a"])
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("login %q sent directly for evil.test: %d %.200s, want 401", user, resp.StatusCode, body)
		}
		for _, r := range e.since(seen) {
			t.Errorf("evil.test received %s %s (Authorization %q)", r.method, r.uri, cut(r.authorization))
		}
	}
	// Control: basic.test's login, sent directly, reads basic.test.
	resp, body, _ := do(t, http.MethodGet, c.http.URL+"/v2/basic.test/team/app/manifests/v1", map[string]string{
		"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte("basic.test/alice:alice-secret-3x")),
		"Accept":        acceptManifests,
	})
	if resp.StatusCode != http.StatusOK {
		t.Errorf("control: basic.test/alice sent directly for basic.test: %d %.200s", resp.StatusCode, body)
	}
}

// cut shortens a credential for a failure message.
func cut(s string) string {
	if len(s) > 24 {
		return s[:24] + "..."
	}
	return s
}
