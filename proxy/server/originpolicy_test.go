package server_test

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/proxy/origin"
	"github.com/cove-oci/cove/proxy/server"
)

// The origin policy end to end: refused origins get 403 DENIED naming the policy, are never
// reached, and are counted by reason.
func TestOriginPolicy(t *testing.T) {
	blob := []byte("cove origin policy")
	d := digest.FromBytes(blob)
	var innerHits, outerHits atomic.Int32
	inner := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		innerHits.Add(1)
		w.Write(blob)
	}))
	defer inner.Close()
	innerAddr := strings.TrimPrefix(inner.URL, "http://")
	_, innerPort, _ := net.SplitHostPort(innerAddr)
	// A "public" registry (allowed by name; on loopback here) that redirects blob reads to
	// a loopback address, as a hostile or compromised registry could.
	outer := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		outerHits.Add(1)
		if strings.Contains(r.URL.Path, "/blobs/") {
			http.Redirect(w, r, inner.URL+r.URL.Path, http.StatusTemporaryRedirect)
			return
		}
		w.WriteHeader(200)
	}))
	defer outer.Close()
	_, outerPort, _ := net.SplitHostPort(strings.TrimPrefix(outer.URL, "http://"))
	public := "public.example:" + outerPort
	onprem := "onprem.example:" + innerPort

	c := newCacheWith(t, func(cfg *server.Config) {
		cfg.OriginPolicy = origin.PolicyConfig{
			Allow: []string{"public.example"},
			Resolve: func(_ context.Context, host string) ([]netip.Addr, error) {
				switch host {
				case "public.example":
					return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
				case "onprem.example":
					return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
				}
				return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
			},
		}
	}, public, onprem)

	denied := func(u, reason string) {
		t.Helper()
		_, body := mustGet(t, u, nil, http.StatusForbidden)
		var doc struct {
			Errors []struct{ Code, Message string }
		}
		if err := json.Unmarshal(body, &doc); err != nil || len(doc.Errors) != 1 || doc.Errors[0].Code != "DENIED" ||
			!strings.Contains(doc.Errors[0].Message, "origin policy") {
			t.Fatalf("GET %s: want DENIED naming the policy, got %s", u, body)
		}
		if reason != "" && !strings.Contains(doc.Errors[0].Message, reason) {
			t.Fatalf("GET %s: message %q does not give the reason %s", u, doc.Errors[0].Message, reason)
		}
	}
	blobPath := "/v2/team/app/blobs/" + d.String()
	// Loopback, not named by --origin-plain-http: refused.
	denied(c.url(innerAddr, blobPath), "loopback")
	denied(c.url(innerAddr, "/v2/team/app/tags/list"), "loopback")
	// A manifest by tag is asked with a HEAD first: the policy's message still comes back.
	denied(c.url(innerAddr, "/v2/team/app/manifests/v1"), "loopback")
	// The cloud metadata endpoint: refused, whatever the path.
	denied(c.url("169.254.169.254", "/v2/team/app/tags/list"), "metadata")
	// An allowed origin redirecting to a loopback address: refused at the redirect.
	denied(c.url(public, blobPath), "")
	if innerHits.Load() != 0 {
		t.Fatalf("refused origin reached %d times", innerHits.Load())
	}
	if outerHits.Load() != 1 {
		t.Fatalf("allowed origin asked %d times, want 1", outerHits.Load())
	}
	// The plain-HTTP host is allowed by name and port, even on loopback.
	if _, body := mustGet(t, c.url(onprem, blobPath), nil, 200); string(body) != string(blob) {
		t.Fatalf("allowed origin: got %q", body)
	}
	c.settle(t)

	m := c.srv.Metrics()
	for reason, want := range map[string]float64{"loopback": 4, "metadata": 1} {
		if got := testutil.ToFloat64(m.OriginRefused.WithLabelValues(reason)); got != want {
			t.Errorf("cove_origin_refused_total{reason=%q} = %v, want %v", reason, got, want)
		}
	}
}

// A CIDR allow lets an origin on a private (here: loopback) range through, checked on the
// address dialled (here: after a redirect to another name); a deny beats it.
func TestOriginPolicyCIDRAndDeny(t *testing.T) {
	var hits atomic.Int32
	inner := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.WriteHeader(200)
	}))
	defer inner.Close()
	_, innerPort, _ := net.SplitHostPort(strings.TrimPrefix(inner.URL, "http://"))
	outer := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://onprem.example:"+innerPort+r.URL.Path, http.StatusTemporaryRedirect)
	}))
	defer outer.Close()
	_, outerPort, _ := net.SplitHostPort(strings.TrimPrefix(outer.URL, "http://"))
	public := "public.example:" + outerPort
	resolve := func(_ context.Context, host string) ([]netip.Addr, error) {
		if host == "public.example" || host == "onprem.example" {
			return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
		}
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	for _, tt := range []struct {
		allow, deny []string
		want        int
		reason      string
	}{
		{nil, nil, http.StatusForbidden, "loopback"},
		{[]string{"127.0.0.0/8"}, nil, 200, ""},
		{[]string{"127.0.0.0/8"}, []string{"onprem.example"}, http.StatusForbidden, "denied"},
		// A deny CIDR beats a name allow (and here refuses public.example itself).
		{[]string{"onprem.example"}, []string{"127.0.0.1/32"}, http.StatusForbidden, "denied"},
	} {
		c := newCacheWith(t, func(cfg *server.Config) {
			cfg.OriginPolicy = origin.PolicyConfig{Allow: tt.allow, Deny: tt.deny, Resolve: resolve}
		}, public)
		before := hits.Load()
		_, body := mustGet(t, c.url(public, "/v2/team/app/tags/list"), nil, tt.want)
		if tt.reason != "" {
			if !strings.Contains(string(body), "DENIED") {
				t.Fatalf("%+v: %s", tt, body)
			}
			if got := testutil.ToFloat64(c.srv.Metrics().OriginRefused.WithLabelValues(tt.reason)); got != 1 {
				t.Fatalf("%+v: refused{reason=%s} = %v", tt, tt.reason, got)
			}
		}
		if reached := hits.Load() - before; (tt.want == 200) != (reached == 1) {
			t.Fatalf("%+v: inner reached %d times", tt, reached)
		}
	}
}
