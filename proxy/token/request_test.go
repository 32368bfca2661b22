package token

import (
	"slices"
	"testing"

	"github.com/cove-oci/cove/proxy/route"
)

// Push scopes are brokered like pull scopes: mapped to the origin's naming, for one
// registry at a time.
func TestParseTokenRequestPushScopes(t *testing.T) {
	rt := route.Router{DefaultRegistry: "registry.test"}
	for _, tc := range []struct {
		query    string
		registry string
		scopes   []string
	}{
		{"scope=repository:registry.test/team-a/app:pull,push", "registry.test", []string{"repository:team-a/app:pull,push"}},
		{"scope=repository:team-a/app:push", "registry.test", []string{"repository:team-a/app:push"}},
		{"scope=repository:ghcr.io/team/app:push,pull+repository:ghcr.io/team/base:pull", "ghcr.io",
			[]string{"repository:team/app:push,pull", "repository:team/base:pull"}},
		{"scope=repository:alpine:pull,push&service=cove", "registry.test", []string{"repository:alpine:pull,push"}},
	} {
		reg, scopes, _, err := parseTokenRequest(rt, tc.query)
		if err != nil || reg != tc.registry || !slices.Equal(scopes, tc.scopes) {
			t.Errorf("%s: %q %q %v, want %q %q", tc.query, reg, scopes, err, tc.registry, tc.scopes)
		}
	}
	// A push to one registry and a mount source at another: refused, nothing brokered.
	if _, _, _, err := parseTokenRequest(rt, "scope=repository:registry.test/team-a/app:pull,push+repository:evil.example/x:pull"); err == nil {
		t.Error("scopes of two registries were accepted")
	}
}
