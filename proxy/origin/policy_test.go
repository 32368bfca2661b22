package origin

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
)

func TestParsePattern(t *testing.T) {
	for _, tt := range []struct {
		pattern   string
		host      string // host:port the request names
		addr      string // address dialled
		wantMatch bool
	}{
		{"registry.local", "registry.local:5000", "10.0.0.1", true},
		{"registry.local", "REGISTRY.local.:443", "10.0.0.1", true},
		{"registry.local:5000", "registry.local:5000", "10.0.0.1", true},
		{"registry.local:5000", "registry.local:5001", "10.0.0.1", false},
		{"*.corp.example", "a.corp.example:443", "10.0.0.1", true},
		{"*.corp.example", "a.b.corp.example:443", "10.0.0.1", true},
		{"*.corp.example", "corp.example:443", "10.0.0.1", false},
		{"*.corp.example", "evilcorp.example:443", "10.0.0.1", false},
		{"reg-*.corp.example", "reg-eu.corp.example:443", "10.0.0.1", true},
		{"reg-*.corp.example", "x.reg-eu.corp.example:443", "10.0.0.1", false},
		{"*", "anything:443", "10.0.0.1", true},
		{"*", "a.b.example:443", "10.0.0.1", true},
		{"*", "127.0.0.1:5000", "127.0.0.1", true},
		{"*:5000", "a.b.example:5000", "10.0.0.1", true},
		{"*:5000", "a.b.example:443", "10.0.0.1", false},
		{"10.20.0.0/16", "whatever.example:443", "10.20.3.4", true},
		{"10.20.0.0/16", "whatever.example:443", "10.21.3.4", false},
		{"10.20.0.0/16", "whatever.example:443", "::ffff:10.20.3.4", true},
		{"::ffff:10.20.0.0/112", "whatever.example:443", "10.20.3.4", true},
		{"fd00::/8", "x:443", "fd12::1", true},
		{"10.1.2.3", "x:443", "10.1.2.3", true},
		{"127.0.0.1:5000", "127.0.0.1:5000", "127.0.0.1", true},
		{"127.0.0.1:5000", "127.0.0.1:5001", "127.0.0.1", false},
		{"[::1]:5000", "[::1]:5000", "::1", true},
	} {
		p, err := ParsePattern(tt.pattern)
		if err != nil {
			t.Fatalf("ParsePattern(%q): %v", tt.pattern, err)
		}
		host, port, err := splitAddr(tt.host)
		if err != nil {
			t.Fatal(err)
		}
		a := netip.MustParseAddr(tt.addr).Unmap()
		if got := p.matchName(host, port) || p.matchAddr(a); got != tt.wantMatch {
			t.Errorf("%q on %s (%s) = %v, want %v", tt.pattern, tt.host, tt.addr, got, tt.wantMatch)
		}
	}
	for _, bad := range []string{"", "10.0.0.0/33", "http://x", "a..b", "x:99999", "x:0", "x:05", "[x]:5", "a b", "fe80::1%eth0", "é.example", "x:"} {
		if _, err := ParsePattern(bad); err == nil {
			t.Errorf("ParsePattern(%q) accepted", bad)
		}
	}
}

func TestPolicyCheck(t *testing.T) {
	p, err := NewPolicy(PolicyConfig{
		Allow: []string{"10.0.0.0/8", "registry.corp:5000", "*.corp.example"},
		Deny:  []string{"10.66.0.0/16", "bad.corp.example"},
		Self:  []string{"10.0.0.9:5005"},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ host, port, addr, want string }{
		{"onprem.example", "443", "10.1.2.3", ""},              // CIDR allow: a private origin let through
		{"onprem.example", "443", "10.66.1.1", ReasonDenied},   // deny beats the CIDR allow
		{"bad.corp.example", "443", "8.8.8.8", ReasonDenied},   // deny by name beats the glob allow
		{"ok.corp.example", "443", "192.168.1.1", ""},          // allowed by name
		{"registry.corp", "5000", "127.0.0.1", ""},             // allowed by name and port
		{"registry.corp", "5001", "127.0.0.1", ReasonLoopback}, // other port: defaults apply
		{"x.example", "5005", "10.0.0.9", ReasonSelf},          // cove-cache itself, despite 10/8
		{"x.example", "5006", "10.0.0.9", ""},
		{"metadata.example", "80", "169.254.169.254", ReasonMetadata},
		{"public.example", "443", "8.8.8.8", ""},
	} {
		if got := p.check(tt.host, tt.port, netip.MustParseAddr(tt.addr)); got != tt.want {
			t.Errorf("check(%s:%s -> %s) = %q, want %q", tt.host, tt.port, tt.addr, got, tt.want)
		}
	}
}

// resolver answers from a table, so names can point wherever a test needs.
func resolver(table map[string][]string) func(context.Context, string) ([]netip.Addr, error) {
	return func(_ context.Context, host string) ([]netip.Addr, error) {
		var out []netip.Addr
		for _, a := range table[host] {
			out = append(out, netip.MustParseAddr(a))
		}
		if out == nil {
			return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
		}
		return out, nil
	}
}

type refusal struct {
	registry, reason string
}

func newPolicyClient(t *testing.T, cfg PolicyConfig, plain ...string) (*Client, *[]refusal) {
	t.Helper()
	p, err := NewPolicy(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var refused []refusal
	var observed atomic.Int32
	c := New(WithPlainHTTP(plain...), WithPolicy(p),
		WithObserver(func(string, int, error) { observed.Add(1) }),
		WithRefused(func(registry string, err *RefusedError) {
			refused = append(refused, refusal{registry, err.Reason})
		}))
	return c, &refused
}

// wantDenied checks Do answered a refusal as a 403 DENIED naming the policy, never the address.
func wantDenied(t *testing.T, resp *http.Response, err error, addr string) {
	t.Helper()
	if err != nil {
		t.Fatalf("Do: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var doc struct {
		Errors []struct{ Code, Message string }
	}
	if resp.StatusCode != http.StatusForbidden || json.Unmarshal(body, &doc) != nil || len(doc.Errors) != 1 || doc.Errors[0].Code != "DENIED" {
		t.Fatalf("want 403 DENIED, got %d %s", resp.StatusCode, body)
	}
	if !strings.Contains(doc.Errors[0].Message, "origin policy") || (addr != "" && strings.Contains(doc.Errors[0].Message, addr)) {
		t.Fatalf("message %q should name the policy and not the address %s", doc.Errors[0].Message, addr)
	}
}

func countingServer(t *testing.T, h http.HandlerFunc) (*httptest.Server, string, *atomic.Int32) {
	t.Helper()
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if h != nil {
			h(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return srv, strings.TrimPrefix(srv.URL, "http://"), &hits
}

func TestMetadataRefused(t *testing.T) {
	c, refused := newPolicyClient(t, PolicyConfig{})
	for _, reg := range []string{"169.254.169.254", "169.254.169.254:80", "[fd00:ec2::254]"} {
		resp, err := c.Do(t.Context(), http.MethodGet, reg, "/v2/", nil, http.Header{}, nil)
		wantDenied(t, resp, err, "")
	}
	if len(*refused) != 3 || (*refused)[0].reason != ReasonMetadata || (*refused)[2].reason != ReasonMetadata {
		t.Fatalf("refusals %v", *refused)
	}
}

func TestLoopbackRefusedUnlessAllowed(t *testing.T) {
	_, host, hits := countingServer(t, nil)
	_, port, _ := net.SplitHostPort(host)

	// Not named by --origin-plain-http nor allowed: refused (the dial is checked before any
	// TLS, so the scheme does not matter).
	c, refused := newPolicyClient(t, PolicyConfig{})
	resp, err := c.Do(t.Context(), http.MethodGet, host, "/v2/", nil, http.Header{}, nil)
	wantDenied(t, resp, err, "") // (the registry the client named is an address itself)
	if len(*refused) != 1 || (*refused)[0] != (refusal{host, ReasonLoopback}) {
		t.Fatalf("refusals %v", *refused)
	}

	// A name that resolves to loopback is refused too: the real "localhost", and a
	// rebinding name answering one public and one loopback address.
	c, refused = newPolicyClient(t, PolicyConfig{Resolve: resolver(map[string][]string{
		"localhost":      {"127.0.0.1"},
		"rebind.example": {"93.184.215.14", "127.0.0.1"},
	})})
	for _, reg := range []string{"localhost:" + port, "rebind.example:" + port} {
		resp, err = c.Do(t.Context(), http.MethodGet, reg, "/v2/", nil, http.Header{}, nil)
		wantDenied(t, resp, err, "127.0.0.1")
	}
	if len(*refused) != 2 || (*refused)[0].reason != ReasonLoopback || (*refused)[1].reason != ReasonLoopback {
		t.Fatalf("refusals %v", *refused)
	}

	// --origin-plain-http allows it by name and port; so does --origin-allow.
	// A CIDR allow lets it through by the address dialled.
	for _, cfg := range []struct {
		cfg      PolicyConfig
		plain    []string
		implicit bool // the plain-HTTP host is allowed by name too
	}{
		{PolicyConfig{}, []string{host}, true},
		{PolicyConfig{Allow: []string{host}}, []string{host}, false},
		{PolicyConfig{Allow: []string{"localhost"}}, []string{"localhost:" + port}, false},
		{PolicyConfig{Allow: []string{"127.0.0.0/8", "::1/128"}}, []string{"localhost:" + port}, false},
	} {
		c, refused = newPolicyClient(t, cfg.cfg, cfg.plain...)
		if !cfg.implicit {
			// Speak plain HTTP to the test server without its implicit allow: only the
			// rule under test may let the request through.
			p, err := NewPolicy(cfg.cfg)
			if err != nil {
				t.Fatal(err)
			}
			c.http.Transport = policyTransport(p)
		}
		resp, err = c.Do(t.Context(), http.MethodGet, cfg.plain[0], "/v2/", nil, http.Header{}, nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%+v: %v %v", cfg, resp, err)
		}
		resp.Body.Close()
		if len(*refused) != 0 {
			t.Fatalf("refusals %v", *refused)
		}
	}
	if hits.Load() != 4 {
		t.Fatalf("origin hit %d times, want 4 (only the allowed requests)", hits.Load())
	}
}

func TestRedirectToPrivateRefused(t *testing.T) {
	_, inner, innerHits := countingServer(t, nil)
	_, innerPort, _ := net.SplitHostPort(inner)
	target := "http://" + inner + "/secret"
	_, outer, outerHits := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, target, http.StatusTemporaryRedirect)
	})
	_, outerPort, _ := net.SplitHostPort(outer)
	// public.example is allowed by name (it happens to live on loopback in this test); it
	// redirects to a loopback address, and then to a name resolving to a private address.
	res := resolver(map[string][]string{
		"public.example":   {"127.0.0.1"},
		"internal.example": {"10.0.0.7"},
	})
	for _, to := range []string{"http://" + inner + "/secret", "http://internal.example:" + innerPort + "/secret"} {
		target = to
		c, refused := newPolicyClient(t, PolicyConfig{Allow: []string{"public.example"}, Resolve: res}, "public.example:"+outerPort)
		resp, err := c.Do(t.Context(), http.MethodGet, "public.example:"+outerPort, "/v2/a/blobs/sha256:x", nil, http.Header{}, nil)
		wantDenied(t, resp, err, "")
		if len(*refused) != 1 || (*refused)[0].registry != "public.example:"+outerPort {
			t.Fatalf("refusals %v", *refused)
		}
	}
	if outerHits.Load() != 2 || innerHits.Load() != 0 {
		t.Fatalf("outer hit %d, inner hit %d: the redirect target must never be reached", outerHits.Load(), innerHits.Load())
	}
}

func TestDenyBeatsAllow(t *testing.T) {
	_, host, hits := countingServer(t, nil)
	_, port, _ := net.SplitHostPort(host)
	for _, deny := range []string{"127.0.0.1/32", "localhost", "*:" + port} {
		c, refused := newPolicyClient(t, PolicyConfig{Allow: []string{"127.0.0.0/8", "localhost"}, Deny: []string{deny}}, "localhost:"+port)
		resp, err := c.Do(t.Context(), http.MethodGet, "localhost:"+port, "/v2/", nil, http.Header{}, nil)
		wantDenied(t, resp, err, "")
		if len(*refused) != 1 || (*refused)[0].reason != ReasonDenied {
			t.Fatalf("deny %s: refusals %v", deny, *refused)
		}
	}
	if hits.Load() != 0 {
		t.Fatal("a denied origin was reached")
	}
}

func TestDenyByRegistryName(t *testing.T) {
	// docker.io is reached at registry-1.docker.io: a deny on the name the client uses
	// refuses it before any lookup.
	c, refused := newPolicyClient(t, PolicyConfig{Deny: []string{"docker.io"}, Resolve: resolver(nil)})
	resp, err := c.Do(t.Context(), http.MethodGet, "docker.io", "/v2/", nil, http.Header{}, nil)
	wantDenied(t, resp, err, "")
	if len(*refused) != 1 || (*refused)[0].reason != ReasonDenied {
		t.Fatalf("refusals %v", *refused)
	}
}

// A transport given with WithTransport still has every request (redirects included) vetted.
func TestCustomTransportVetted(t *testing.T) {
	_, host, hits := countingServer(t, nil)
	p, err := NewPolicy(PolicyConfig{})
	if err != nil {
		t.Fatal(err)
	}
	c := New(WithTransport(http.DefaultTransport), WithPolicy(p))
	resp, err := c.Do(t.Context(), http.MethodGet, host, "/v2/", nil, http.Header{}, nil)
	wantDenied(t, resp, err, "")
	c = New(WithTransport(http.DefaultTransport), WithPolicy(p), WithPlainHTTP(host))
	resp, err = c.Do(t.Context(), http.MethodGet, host, "/v2/", nil, http.Header{}, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("%v %v", resp, err)
	}
	resp.Body.Close()
	if hits.Load() != 1 {
		t.Fatalf("hits %d", hits.Load())
	}
}

func TestSelfRefused(t *testing.T) {
	_, host, hits := countingServer(t, nil)
	// Even an address allow (loopback) does not let cove-cache call itself; a rule naming
	// its very host and port does (the plain-HTTP host is such a rule).
	c, refused := newPolicyClient(t, PolicyConfig{Allow: []string{"127.0.0.0/8"}, Self: []string{host}})
	resp, err := c.Do(t.Context(), http.MethodGet, host, "/v2/", nil, http.Header{}, nil)
	wantDenied(t, resp, err, "")
	if len(*refused) != 1 || (*refused)[0].reason != ReasonSelf || hits.Load() != 0 {
		t.Fatalf("refusals %v, hits %d", *refused, hits.Load())
	}
}

func TestRefusedErrorFromDial(t *testing.T) {
	p, err := NewPolicy(PolicyConfig{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = p.DialContext(&net.Dialer{})(t.Context(), "tcp", "127.0.0.1:1")
	var rerr *RefusedError
	if !errors.As(err, &rerr) || rerr.Reason != ReasonLoopback {
		t.Fatalf("dial: %v", err)
	}
}

func FuzzParsePattern(f *testing.F) {
	for _, s := range []string{"*.corp.example", "registry.local:5000", "10.20.0.0/16", "fd00::/8", "10.1.2.3",
		"[::1]:5000", "*", "a*b*.c", "x:99999", "::ffff:10.0.0.0/104", "*.*.x", "[x]:1", ""} {
		f.Add(s, "a.corp.example", "443")
	}
	f.Fuzz(func(t *testing.T, pattern, host, port string) {
		p, err := ParsePattern(pattern)
		if err != nil {
			return
		}
		if p.String() != pattern {
			t.Fatalf("String() = %q, want %q", p.String(), pattern)
		}
		if _, err := ParsePattern(p.String()); err != nil {
			t.Fatalf("reparse %q: %v", pattern, err)
		}
		p.matchName(strings.ToLower(host), port)
		if p.IsAddr() && !p.matchAddr(p.prefix.Addr()) {
			t.Fatalf("%q does not match its own address", pattern)
		}
	})
}

// A host-name allow rule trusts a name, not the address its lookup answers: it lifts the
// loopback and private refusals, never metadata or link-local. An address rule (a CIDR, an
// address, or an address literal with a port) names the address itself and lifts them.
func TestNameAllowDoesNotLiftMetadata(t *testing.T) {
	p, err := NewPolicy(PolicyConfig{Allow: []string{"*.corp.example", "registry.local:5000"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ host, port, addr, want string }{
		{"a.corp.example", "443", "10.1.2.3", ""},
		{"a.corp.example", "443", "127.0.0.1", ""},
		{"a.corp.example", "443", "fd12::1", ""},
		{"a.corp.example", "443", "169.254.169.254", ReasonMetadata},
		{"a.corp.example", "443", "::ffff:169.254.169.254", ReasonMetadata},
		{"a.corp.example", "443", "64:ff9b::a9fe:a9fe", ReasonMetadata},
		{"a.corp.example", "443", "2002:a9fe:a9fe::1", ReasonMetadata},
		{"a.corp.example", "443", "fd00:ec2::254", ReasonMetadata},
		{"a.corp.example", "443", "100.100.100.200", ReasonMetadata},
		{"a.corp.example", "443", "169.254.10.1", ReasonLinkLocal},
		{"a.corp.example", "443", "fe80::1", ReasonLinkLocal},
		{"a.corp.example", "443", "64:ff9b:1::a9fe:101", ReasonLinkLocal},
		{"registry.local", "5000", "169.254.169.254", ReasonMetadata}, // with a port, still a name
	} {
		if got := p.check(tt.host, tt.port, netip.MustParseAddr(tt.addr)); got != tt.want {
			t.Errorf("name allow: check(%s:%s -> %s) = %q, want %q", tt.host, tt.port, tt.addr, got, tt.want)
		}
	}

	p, err = NewPolicy(PolicyConfig{Allow: []string{"*.corp.example", "169.254.0.0/16", "fe80::/10", "169.254.170.2:80"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ host, port, addr, want string }{
		{"a.corp.example", "443", "169.254.169.254", ""}, // the CIDR lifts it, whatever the name
		{"x.example", "443", "169.254.10.1", ""},
		{"x.example", "443", "fe80::1", ""},
		{"169.254.170.2", "80", "169.254.170.2", ""}, // an address literal names the address
		{"x.example", "443", "fd00:ec2::254", ReasonMetadata},
	} {
		if got := p.check(tt.host, tt.port, netip.MustParseAddr(tt.addr)); got != tt.want {
			t.Errorf("address allow: check(%s:%s -> %s) = %q, want %q", tt.host, tt.port, tt.addr, got, tt.want)
		}
	}

	// Through the client: a name under an allowed glob whose lookup answers the metadata
	// address is refused, and nothing is dialled; --origin-plain-http does not lift it either.
	c, refused := newPolicyClient(t, PolicyConfig{
		Allow: []string{"*.corp.example"},
		Resolve: resolver(map[string][]string{
			"meta.corp.example":  {"169.254.169.254"},
			"nat64.corp.example": {"64:ff9b::a9fe:a9fe"},
			"link.corp.example":  {"fe80::1"},
		}),
	}, "meta.corp.example:80")
	for _, reg := range []string{"meta.corp.example:80", "nat64.corp.example", "link.corp.example"} {
		resp, err := c.Do(t.Context(), http.MethodGet, reg, "/v2/", nil, http.Header{}, nil)
		wantDenied(t, resp, err, "169.254")
	}
	want := []refusal{{"meta.corp.example:80", ReasonMetadata}, {"nat64.corp.example", ReasonMetadata}, {"link.corp.example", ReasonLinkLocal}}
	if len(*refused) != len(want) {
		t.Fatalf("refusals %v, want %v", *refused, want)
	}
	for i := range want {
		if (*refused)[i] != want[i] {
			t.Fatalf("refusals %v, want %v", *refused, want)
		}
	}
}
