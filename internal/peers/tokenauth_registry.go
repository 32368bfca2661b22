package peers

import (
	"fmt"
	"strconv"
	"testing"
)

// WithTokenAuth makes the registry use token authentication (distribution's `auth:
// token`) trusting ts: its challenge is `Bearer realm=ts.Realm,service=ts.Service,
// scope=...`, and it accepts only JWTs issued by ts. Push with
// WithPushAuth(TokenAdmin, password): go-containerregistry does the token flow.
func WithTokenAuth(ts *TokenService) RegistryOption {
	return func(c *registryConfig) {
		q := strconv.Quote
		c.auth = fmt.Sprintf("auth:\n  token:\n    realm: %s\n    service: %s\n    issuer: %s\n    rootcertbundle: %s\n",
			q(ts.Realm), q(ts.Service), q(ts.Issuer), q(ts.CertBundle))
	}
}

// TokenOrigin is a distribution registry with token authentication and its token
// service: the multi-tenant origin of the tenancy tests and benchmarks.
type TokenOrigin struct {
	*Registry
	Tokens *TokenService
	// Passwords holds every user's password (TokenAdmin's included).
	Passwords map[string]string
}

// StartTokenOrigin starts a token service for users (name -> password; TokenAdmin is
// added) and a registry trusting it (with opts too), both stopped at cleanup.
func StartTokenOrigin(t testing.TB, users map[string]string, opts ...RegistryOption) *TokenOrigin {
	t.Helper()
	pw := map[string]string{TokenAdmin: "admin-secret-0x"}
	for u, p := range users {
		pw[u] = p
	}
	ts := StartTokenService(t, pw)
	return &TokenOrigin{Registry: StartRegistry(t, append([]RegistryOption{WithTokenAuth(ts)}, opts...)...), Tokens: ts, Passwords: pw}
}

// Push pushes a random image (see PushRandomImage) as TokenAdmin.
func (o *TokenOrigin) Push(t testing.TB, repoAndTag string, layers int, layerSize int64) Image {
	t.Helper()
	return PushRandomImage(t, o.Addr, repoAndTag, layers, layerSize, WithPushAuth(TokenAdmin, o.Passwords[TokenAdmin]))
}
