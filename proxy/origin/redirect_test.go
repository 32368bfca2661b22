package origin

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

const secret = "s3cr3t-signature"

// A registry redirects a blob read to a presigned URL that then fails in every way a real
// one can: the error the client returns, and the one its observer sees, must name no
// query or user information.
func TestErrorsNameNoQuery(t *testing.T) {
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done() // never answers: the client's deadline ends it
	}))
	defer hang.Close()
	closed := httptest.NewServer(http.NotFoundHandler())
	closedURL := closed.URL
	closed.Close() // nothing listens there any more: connection refused
	hangHost := strings.TrimPrefix(hang.URL, "http://")

	var target string
	_, reg, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/loop" {
			http.Redirect(w, r, "/loop?X-Amz-Signature="+secret, http.StatusFound)
			return
		}
		w.Header().Set("Location", target)
		w.WriteHeader(http.StatusTemporaryRedirect)
	})
	for _, tt := range []struct {
		name, target, path string
		want               error // errors.Is still holds after redaction
	}{
		{"hangs", hang.URL + "/blob?X-Amz-Signature=" + secret + "&X-Amz-Credential=AKIA", "/v2/a/blobs/sha256:x", context.DeadlineExceeded},
		{"refused", closedURL + "/blob?sig=" + secret, "/v2/a/blobs/sha256:x", nil},
		{"user info", "http://" + secret + ":" + secret + "@" + hangHost + "/blob?sig=" + secret, "/v2/a/blobs/sha256:x", context.DeadlineExceeded},
		{"bad location", "http://[::1/blob?sig=" + secret, "/v2/a/blobs/sha256:x", errBadLocation},
		{"fragment", hang.URL + "/blob#" + secret, "/v2/a/blobs/sha256:x", context.DeadlineExceeded},
		{"redirect loop", "", "/loop", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			target = tt.target
			var observed error
			c := New(WithPlainHTTP(reg), WithObserver(func(_ string, _ int, err error) { observed = err }))
			ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
			defer cancel()
			resp, err := c.Do(ctx, http.MethodGet, reg, tt.path, nil, http.Header{}, nil)
			if err == nil {
				resp.Body.Close()
				t.Fatalf("want an error, got %d", resp.StatusCode)
			}
			for _, e := range []error{err, observed} {
				if e == nil || strings.Contains(e.Error(), secret) || strings.Contains(e.Error(), "AKIA") {
					t.Fatalf("error %v names the secret", e)
				}
			}
			var ue *url.Error
			if !errors.As(err, &ue) || strings.Contains(ue.URL, "?") {
				t.Fatalf("error %#v: want a url.Error without a query", err)
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("error %v is not %v", err, tt.want)
			}
			t.Log(err)
		})
	}

	// Get quotes a URL it rejects, redacted too.
	c := New()
	_, err := c.Get(t.Context(), "https://user:"+secret+"@auth.example/token?scope="+secret, nil)
	if err == nil || strings.Contains(err.Error(), secret) {
		t.Fatalf("Get: %v", err)
	}
}

func TestRedactURL(t *testing.T) {
	for raw, want := range map[string]string{
		"https://u:p@s3.example/b/k?X-Amz-Signature=x#f": "https://s3.example/b/k",
		"/relative?sig=x":         "/relative",
		"https://cdn.example/a?":  "https://cdn.example/a",
		"http://[::1/x?sig=x":     "(unparsable URL)",
		"mailto:someone?subject=": "mailto:(opaque)",
	} {
		if got := redactURL(raw); got != want {
			t.Errorf("redactURL(%q) = %q, want %q", raw, got, want)
		}
	}
}

// recorder is a server that keeps the headers of every request, by Host.
type recorder struct {
	mu   sync.Mutex
	seen map[string]http.Header // by Host header + path
}

func (r *recorder) record(req *http.Request) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen == nil {
		r.seen = map[string]http.Header{}
	}
	r.seen[req.Host+req.URL.Path] = req.Header.Clone()
}

func (r *recorder) get(key string) (http.Header, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	h, ok := r.seen[key]
	return h, ok
}

// Credentials go only to the host:port they were sent to: not to another port of the same
// host (a different server), not to a subdomain (net/http would keep them there), and not
// back after the chain has left.
func TestRedirectKeepsCredentialsToTheirHost(t *testing.T) {
	var rec recorder
	var other *httptest.Server
	other = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { rec.record(r) }))
	defer other.Close()
	otherHost := strings.TrimPrefix(other.URL, "http://")
	var regHost string
	reg := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec.record(r)
		switch r.URL.Path {
		case "/v2/a/blobs/other-port":
			http.Redirect(w, r, other.URL+"/blob?sig=x", http.StatusTemporaryRedirect)
		case "/v2/a/blobs/same-host":
			http.Redirect(w, r, "/storage/blob?sig=x", http.StatusTemporaryRedirect)
		case "/v2/a/blobs/subdomain":
			_, port, _ := net.SplitHostPort(r.Host)
			http.Redirect(w, r, "http://evil.registry.example:"+port+"/stolen", http.StatusTemporaryRedirect)
		case "/stolen":
			http.Redirect(w, r, "http://registry.example:"+strings.Split(r.Host, ":")[1]+"/back", http.StatusTemporaryRedirect)
		}
	}))
	defer reg.Close()
	regHost = strings.TrimPrefix(reg.URL, "http://")
	_, regPort, _ := net.SplitHostPort(regHost)

	header := http.Header{}
	header.Set("Authorization", "Bearer "+secret)
	do := func(c *Client, registry, path string) {
		t.Helper()
		resp, err := c.Do(t.Context(), http.MethodGet, registry, path, nil, header, nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("GET %s%s: %v %v", registry, path, resp, err)
		}
		resp.Body.Close()
	}
	c := New(WithPlainHTTP(regHost, otherHost))

	do(c, regHost, "/v2/a/blobs/other-port")
	if h, ok := rec.get(otherHost + "/blob"); !ok || h.Get("Authorization") != "" || h.Get("Referer") != "" {
		t.Fatalf("other port saw %v (reached %v): want no Authorization, no Referer", h, ok)
	}

	do(c, regHost, "/v2/a/blobs/same-host")
	if h, ok := rec.get(regHost + "/storage/blob"); !ok || h.Get("Authorization") != "Bearer "+secret || h.Get("Referer") != "" {
		t.Fatalf("same host saw %v (reached %v): want Authorization kept, no Referer", h, ok)
	}

	// Names on one server, through the policy's resolver: registry.example redirects to
	// evil.registry.example, which sends the chain back.
	p, err := NewPolicy(PolicyConfig{
		Allow: []string{"registry.example", "*.registry.example"},
		Resolve: func(context.Context, string) ([]netip.Addr, error) {
			return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	c = New(WithPlainHTTP("registry.example:"+regPort), WithPolicy(p))
	do(c, "registry.example:"+regPort, "/v2/a/blobs/subdomain")
	if h, ok := rec.get("registry.example:" + regPort + "/v2/a/blobs/subdomain"); !ok || h.Get("Authorization") == "" {
		t.Fatalf("the registry itself saw %v", h)
	}
	for _, hop := range []string{"evil.registry.example:" + regPort + "/stolen", "registry.example:" + regPort + "/back"} {
		if h, ok := rec.get(hop); !ok || h.Get("Authorization") != "" {
			t.Fatalf("%s saw %v (reached %v): want no Authorization", hop, h, ok)
		}
	}

	// Get sends its header as given, Cookie included, but not across hosts either.
	cookie := http.Header{"Cookie": {"session=" + secret}, "Authorization": {"Basic " + secret}}
	resp, err := c.Get(t.Context(), "http://registry.example:"+regPort+"/v2/a/blobs/subdomain", cookie)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if h, _ := rec.get("evil.registry.example:" + regPort + "/stolen"); h.Get("Cookie") != "" || h.Get("Authorization") != "" {
		t.Fatalf("subdomain saw %v", h)
	}
}

// An https origin may not send the client to plain http, unless the registry itself is
// a plain-HTTP one.
func TestRedirectDowngradeRefused(t *testing.T) {
	_, plainHost, plainHits := countingServer(t, nil)
	tlsSrv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://"+plainHost+"/blob?sig="+secret, http.StatusTemporaryRedirect)
	}))
	defer tlsSrv.Close()
	tlsHost := strings.TrimPrefix(tlsSrv.URL, "https://")
	tr := tlsSrv.Client().Transport

	c := New(WithTransport(tr))
	resp, err := c.Do(t.Context(), http.MethodGet, tlsHost, "/v2/a/blobs/sha256:x", nil, http.Header{}, nil)
	if err == nil {
		resp.Body.Close()
		t.Fatalf("https -> http redirect followed: %d", resp.StatusCode)
	}
	if !errors.Is(err, ErrRedirectDowngrade) || strings.Contains(err.Error(), secret) || plainHits.Load() != 0 {
		t.Fatalf("error %v (plain server hit %d times)", err, plainHits.Load())
	}
	t.Log(err)

	// A plain-HTTP registry whose chain goes through https and back is followed: plain
	// HTTP is what its operator chose.
	_, plainReg, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, tlsSrv.URL+"/via-tls", http.StatusTemporaryRedirect)
	})
	c = New(WithTransport(tr), WithPlainHTTP(plainReg))
	resp, err = c.Do(t.Context(), http.MethodGet, plainReg, "/v2/a/blobs/sha256:x", nil, http.Header{}, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("plain registry: %v %v", resp, err)
	}
	resp.Body.Close()
	if plainHits.Load() != 1 {
		t.Fatalf("plain server hit %d times, want 1", plainHits.Load())
	}
}
