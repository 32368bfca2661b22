package token

import (
	"net/http"
	"strings"
	"testing"

	"github.com/cove-oci/cove/proxy/route"
)

// The token endpoint's query and the cove tokens clients send back are client input:
// neither may panic, and whatever parses maps to valid names of one registry.
func FuzzParseTokenRequest(f *testing.F) {
	for _, s := range []string{
		"scope=repository:ghcr.io/team/app:pull&service=cove",
		"scope=repository:alpine:pull",
		"scope=repository:localhost/a:pull,push+repository:localhost/b:*",
		"account=alice&client_id=crane&offline_token=true",
		"scope=repository:127.0.0.1:5000/x:pull",
		"scope=registry:catalog:*",
		"scope=repository:a/../b:pull",
	} {
		f.Add(s, "Bearer cove1.eyJyIjoiZ2hjci5pbyJ9")
		f.Add(s, "Basic Z2hjci5pby9hbGljZTpzZWNyZXQ=")
	}
	rt := route.Router{}
	f.Fuzz(func(t *testing.T, query, authorization string) {
		registry, scopes, rest, err := parseTokenRequest(rt, query)
		if err == nil && (registry != "") != (len(scopes) > 0) {
			t.Fatalf("%q: registry %q for %d scopes", query, registry, len(scopes))
		}
		if err == nil && registry != "" {
			if _, err := route.NormalizeHost(registry); err != nil {
				t.Fatalf("%q: registry %q: %v", query, registry, err)
			}
			for _, sc := range scopes {
				typ, name, _ := strings.Cut(sc, ":")
				i := strings.LastIndexByte(name, ':')
				if typ != "repository" || i < 0 || route.ValidateRepository(name[:i]) != nil || name[i+1:] == "" {
					t.Fatalf("%q: mapped scope %q", query, sc)
				}
			}
			for k := range rest {
				if k != "account" && k != "client_id" {
					t.Fatalf("%q: passes on %q", query, k)
				}
			}
		}
		tok, ok, err := decodeCoveToken(http.Header{"Authorization": {authorization}})
		if ok && err == nil && (tok.Registry == "" || !isCarriable(tok.Authorization)) {
			t.Fatalf("%q: decoded to %+v", authorization, tok)
		}
		if l, ok, err := bindLogin(rt, authorization); ok && err == nil {
			if _, err := route.NormalizeHost(l.registry); err != nil || l.user == "" || !isCarriable(l.authorization) {
				t.Fatalf("%q: bound to %q as %q", authorization, l.registry, l.user)
			}
		}
		_ = (&clientChallenge{realm: query, scope: authorization}).header(authorization)
	})
}
