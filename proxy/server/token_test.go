package server_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/origin"
	"github.com/cove-oci/cove/proxy/server"
)

// newAliasedCache starts a cache that reaches origin (a loopback HOST:PORT) by the
// port-less name alias over plain HTTP, the way a client naming a registry in the path
// must write it (the reference grammar allows no port in a path element). Only the dial
// is redirected: the origin policy still vets alias and every other host by name and
// address, allowing alias and localhost (the test token service's realm) explicitly.
func newAliasedCache(t *testing.T, alias, originAddr string, configure func(*server.Config)) *cache {
	t.Helper()
	tr := origin.NewTransport()
	dialer := &net.Dialer{}
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		if addr == alias+":80" {
			addr = originAddr
		}
		return dialer.DialContext(ctx, network, addr)
	}
	return newCacheWith(t, func(cfg *server.Config) {
		cfg.Transport = tr
		cfg.OriginPolicy = origin.PolicyConfig{
			Allow: []string{alias, "localhost"},
			Resolve: func(_ context.Context, host string) ([]netip.Addr, error) {
				if host == alias || host == "localhost" {
					return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
				}
				return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
			},
		}
		if configure != nil {
			configure(cfg)
		}
	}, alias)
}

// crane runs the crane binary against the cache as user ("" for anonymous).
func crane(t *testing.T, c *cache, user, password string, args ...string) (string, error) {
	t.Helper()
	return peers.Crane(t, strings.TrimPrefix(c.http.URL, "http://"), user, password, args...)
}

// Path-prefix routing against a token-authenticated origin, with crane: crane asks
// cove-cache's token endpoint for scopes in its own naming
// (repository:registry.test/team-a/app:pull), and the token the origin's service issues
// for them in the origin's naming works at the origin. Each tenant gets its own images
// and nothing of the other's; anonymous clients get public ones only. The default
// registry (no prefix at all) goes through the same endpoint.
func TestTokenBrokerWithCrane(t *testing.T) {
	reg := peers.StartTokenOrigin(t, map[string]string{"team-a": "team-a-secret-1x", "team-b": "team-b-secret-2x"})
	ts, pw := reg.Tokens, reg.Passwords
	imgA := reg.Push(t, "team-a/app:v1", 2, 64<<10)
	imgB := reg.Push(t, "team-b/app:v1", 2, 64<<10)
	imgP := reg.Push(t, "public/app:v1", 2, 64<<10)
	pushed := len(ts.Issued())
	var logs syncBuffer
	c := newAliasedCache(t, "registry.test", reg.Addr, func(cfg *server.Config) {
		cfg.DefaultRegistry = "registry.test"
		cfg.Logger = slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	host := strings.TrimPrefix(c.http.URL, "http://")

	for _, prefix := range []string{"registry.test/", ""} {
		for _, tc := range []struct {
			user string
			img  peers.Image
			repo string
			ok   bool
		}{
			{"team-a", imgA, "team-a/app", true},
			{"team-b", imgB, "team-b/app", true},
			{"", imgP, "public/app", true},
			{"team-a", imgB, "team-b/app", false},
			{"team-b", imgA, "team-a/app", false},
			{"", imgA, "team-a/app", false},
		} {
			ref := host + "/" + prefix + tc.repo
			out, err := crane(t, c, tc.user, pw[tc.user], "pull", "--format", "oci", ref+":v1", t.TempDir())
			if tc.ok != (err == nil) {
				t.Fatalf("crane pull %s:v1 as %q: ok=%v, want %v: %s", ref, tc.user, err == nil, tc.ok, out)
			}
			// By digest too, once everything a tenant may read is cached.
			got, err := crane(t, c, tc.user, pw[tc.user], "digest", ref+"@"+tc.img.Digest)
			if tc.ok != (err == nil) || tc.ok && got != tc.img.Digest {
				t.Fatalf("crane digest %s@%s as %q: %q, %v", ref, tc.img.Digest, tc.user, got, err)
			}
			layer := ref + "@" + tc.img.Layers[0]
			if _, err := crane(t, c, tc.user, pw[tc.user], "blob", layer); tc.ok != (err == nil) {
				t.Fatalf("crane blob %s as %q: ok=%v, want %v", layer, tc.user, err == nil, tc.ok)
			}
		}
		c.settle(t)
	}
	// Another tenant's cached layer through the tenant's own repository name.
	if out, err := crane(t, c, "team-b", pw["team-b"], "blob", host+"/registry.test/team-b/app@"+imgA.Layers[0]); err == nil {
		t.Fatalf("team-b read team-a's cached layer through team-b/app: %s", out)
	}
	// The origin's token service saw the origin's naming only, with the clients' own
	// credentials, and granted by its policy.
	issued := ts.Issued()[pushed:]
	if len(issued) == 0 {
		t.Fatal("no token reached the origin's token service")
	}
	for _, i := range issued {
		for _, sc := range i.Requested {
			if strings.Contains(sc, "registry.test") {
				t.Fatalf("the origin's token service was asked for the client's naming: %v", i.Requested)
			}
		}
		if i.Service != ts.Service {
			t.Fatalf("token request named service %q, want the origin's %q", i.Service, ts.Service)
		}
	}
	users := map[string]bool{}
	for _, i := range issued {
		users[i.User] = true
	}
	if !users["team-a"] || !users["team-b"] || !users[""] {
		t.Fatalf("token requests by %v, want team-a, team-b and anonymous", users)
	}
	t.Logf("%d token requests reached the origin's token service", len(issued))

	if !strings.Contains(logs.String(), `"path":"/v2/registry.test/team-a/app/manifests/v1"`) {
		t.Fatalf("the debug log did not record the pulls: %.300s", logs.String())
	}
	assertNoSecrets(t, c, &logs, ts.Tokens(), pw)
}

// assertNoSecrets checks that no password, Basic encoding of one (for users, and for
// users with a registry in their name as logins bound to one are written), or token
// appears in any log line (debug included) or metric of c.
func assertNoSecrets(t *testing.T, c *cache, logs *syncBuffer, tokens []string, users map[string]string) {
	t.Helper()
	_, metricsText := mustGet(t, c.http.URL+"/metrics", nil, 200)
	seen := logs.String() + string(metricsText)
	secrets := tokens
	for u, p := range users {
		secrets = append(secrets, p, base64.StdEncoding.EncodeToString([]byte(u+":"+p)))
	}
	for _, sec := range secrets {
		if sec != "" && strings.Contains(seen, sec) {
			t.Fatalf("a credential or token appears in cove-cache's logs or metrics: %.12s...", sec)
		}
	}
}

// debugLogs sends c's logs, debug included, to logs.
func debugLogs(logs *syncBuffer) func(*server.Config) {
	return func(cfg *server.Config) {
		cfg.Logger = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
}

// syncBuffer is a log sink safe for the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// An origin with Basic authentication (or none) gets a cove token: the client's own
// credentials, checked at the origin when issued, bound to that registry.
func TestTokenBrokerBasicOrigin(t *testing.T) {
	reg := peers.StartRegistry(t, peers.WithHtpasswd("alice", "alice-secret-3x"))
	img := peers.PushRandomImage(t, reg.Addr, "team/app:v1", 1, 4096, peers.WithPushAuth("alice", "alice-secret-3x"))
	c := newAliasedCache(t, "registry.test", reg.Addr, nil)
	host := strings.TrimPrefix(c.http.URL, "http://")
	ref := host + "/registry.test/team/app"
	if out, err := crane(t, c, "registry.test/alice", "alice-secret-3x", "pull", "--format", "oci", ref+":v1", t.TempDir()); err != nil {
		t.Fatalf("crane pull with the right password: %v: %s", err, out)
	}
	if got, err := crane(t, c, "registry.test/alice", "alice-secret-3x", "digest", ref+":v1"); err != nil || got != img.Digest {
		t.Fatalf("crane digest: %q %v", got, err)
	}
	for _, who := range [][2]string{{"registry.test/alice", "wrong"}, {"", ""}} {
		if out, err := crane(t, c, who[0], who[1], "digest", ref+":v1"); err == nil {
			t.Fatalf("crane digest as %q with password %q succeeded: %s", who[0], who[1], out)
		}
	}

	// The token endpoint refuses wrong credentials before any pull.
	resp, body, _ := doBasic(t, c.http.URL+"/token?scope=repository:registry.test/team/app:pull", "registry.test/alice", "wrong")
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("token with a wrong password: %d %s", resp.StatusCode, body)
	}
	// A plain user name is a login for the default registry (Docker Hub here), so it is
	// refused for registry.test, before anything is sent.
	resp, body, _ = doBasic(t, c.http.URL+"/token?scope=repository:registry.test/team/app:pull", "alice", "alice-secret-3x")
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(body), "log in to cove-cache as registry.test/") {
		t.Fatalf("token for registry.test with a login for the default registry: %d %s", resp.StatusCode, body)
	}
	resp, body, _ = doBasic(t, c.http.URL+"/token?scope=repository:registry.test/team/app:pull", "registry.test/alice", "alice-secret-3x")
	var tok struct{ Token string }
	if resp.StatusCode != 200 || json.Unmarshal(body, &tok) != nil || tok.Token == "" {
		t.Fatalf("token: %d %s", resp.StatusCode, body)
	}
	if strings.Contains(string(body), "alice-secret-3x") {
		t.Fatal("the token shows the password in clear")
	}
	bearer := map[string]string{"Authorization": "Bearer " + tok.Token, "Accept": acceptManifests}
	mustGet(t, c.http.URL+"/v2/registry.test/team/app/manifests/v1", bearer, 200)
	// Bound to its registry: presented for another, it is refused with a fresh challenge.
	resp, _, _ = do(t, http.MethodGet, c.url("other.test", "/v2/team/app/manifests/v1"), bearer)
	if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("Www-Authenticate"), `error="invalid_token"`) {
		t.Fatalf("token for registry.test used with other.test: %d %q", resp.StatusCode, resp.Header.Get("Www-Authenticate"))
	}
	// A forged token grants nothing the credentials in it would not.
	forged := map[string]string{"Authorization": "Bearer cove1." + base64.RawURLEncoding.EncodeToString([]byte(`{"r":"registry.test","a":"Basic `+base64.StdEncoding.EncodeToString([]byte("alice:guess"))+`"}`))}
	mustGet(t, c.http.URL+"/v2/registry.test/team/app/manifests/v1", forged, 401)
	mustGet(t, c.http.URL+"/v2/registry.test/team/app/manifests/v1", map[string]string{"Authorization": "Bearer cove1.!!"}, 401)
	// A token carrying anything but one Authorization value is malformed.
	smuggled := "Bearer cove1." + base64.RawURLEncoding.EncodeToString([]byte(`{"r":"registry.test","a":"Basic eA==\r\nX-Evil: 1"}`))
	mustGet(t, c.http.URL+"/v2/registry.test/team/app/manifests/v1", map[string]string{"Authorization": smuggled}, 401)
}

func doBasic(t *testing.T, u, user, password string) (*http.Response, []byte, error) {
	t.Helper()
	return do(t, http.MethodGet, u, map[string]string{"Authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+password))})
}

// Token requests the broker cannot map are refused with 400 before any origin is asked.
func TestTokenEndpointRefusesBadRequests(t *testing.T) {
	var hits atomic.Int32
	c := newCacheWith(t, func(cfg *server.Config) {
		cfg.Transport = roundTripFunc(func(*http.Request) (*http.Response, error) {
			hits.Add(1)
			return nil, context.Canceled
		})
	})
	for _, q := range []string{
		"scope=registry:catalog:*",
		"scope=repository:ghcr.io/a:pull&scope=repository:quay.io/b:pull",
		"scope=repository:ghcr.io/Upper:pull",
		"scope=repository:ghcr.io/a/../b:pull",
		"scope=repository:ghcr.io/a:pu%22ll",
		"scope=repository:ghcr.io/a:",
		"scope=repository:nocolon",
		"scope=" + strings.Repeat("repository:ghcr.io/a:pull+", 17),
		"scope=%zz",
	} {
		resp, body, err := do(t, http.MethodGet, c.http.URL+"/token?"+q, nil)
		if err != nil || resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("token?%s: %v %v %s", q, resp.StatusCode, err, body)
		}
	}
	resp, _, _ := do(t, http.MethodPost, c.http.URL+"/token", nil)
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("POST /token: %d, want 404 (OAuth2 clients fall back to GET)", resp.StatusCode)
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("bad token requests reached an origin %d times", n)
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// The realm comes from the origin: a hostile registry naming the cloud metadata address
// or a loopback service as its token realm gets nothing fetched, and the refusal is
// counted like any other.
func TestTokenRealmUnderOriginPolicy(t *testing.T) {
	var sinkHits atomic.Int32
	sink := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { sinkHits.Add(1) }))
	defer sink.Close()
	var realm atomic.Value
	hostile := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Www-Authenticate", `Bearer realm="`+realm.Load().(string)+`",service="hostile"`)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	defer hostile.Close()
	for reason, r := range map[string]string{"metadata": "http://169.254.169.254/latest/meta-data/token", "loopback": sink.URL + "/token"} {
		realm.Store(r)
		c := newAliasedCache(t, "hostile.test", strings.TrimPrefix(hostile.URL, "http://"), nil) // origins' challenges are remembered
		mustGet(t, c.http.URL+"/token?scope=repository:hostile.test/"+reason+":pull", nil, http.StatusForbidden)
		if got := testutil.ToFloat64(c.srv.Metrics().OriginRefused.WithLabelValues(reason)); got != 1 {
			t.Errorf("cove_origin_refused_total{reason=%q} = %v, want 1", reason, got)
		}
	}
	if n := sinkHits.Load(); n != 0 {
		t.Fatalf("the loopback realm was reached %d times", n)
	}
}

// Behind a load balancer or TLS terminator, the realm is the configured external URL.
func TestTokenRealmFromExternalURL(t *testing.T) {
	c := newCacheWith(t, func(cfg *server.Config) { cfg.ExternalURL = "https://cove.example:5005/" })
	resp, _ := mustGet(t, c.http.URL+"/v2/", nil, http.StatusUnauthorized)
	if got, want := resp.Header.Get("Www-Authenticate"), `Bearer realm="https://cove.example:5005/token",service="cove"`; got != want {
		t.Fatalf("challenge %q, want %q", got, want)
	}
	resp, _, _ = do(t, http.MethodGet, c.http.URL+"/v2/ghcr.io/team/app/manifests/v1", map[string]string{"Authorization": "Bearer cove1.e30"})
	if got, want := resp.Header.Get("Www-Authenticate"), `Bearer realm="https://cove.example:5005/token",service="cove",scope="repository:ghcr.io/team/app:pull",error="invalid_token"`; resp.StatusCode != 401 || got != want {
		t.Fatalf("malformed token: %d %q, want 401 %q", resp.StatusCode, got, want)
	}
}
