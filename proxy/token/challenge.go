package token

import (
	"context"
	"net/http"
	"strconv"

	"github.com/containerd/containerd/v2/core/remotes/docker/auth"

	"github.com/cove-oci/cove/proxy/route"
)

// clientChallenge is the challenge cove-cache gives a client that does not use ns=: its
// own token realm, and the scope in the client's naming.
type clientChallenge struct {
	realm string
	scope string
}

type clientChallengeKey struct{}

// header is the WWW-Authenticate value. errCode is the origin's error parameter
// (insufficient_scope, invalid_token), kept so the client knows why.
func (c *clientChallenge) header(errCode string) string {
	v := `Bearer realm=` + strconv.Quote(c.realm) + `,service="` + coveTokenService + `"`
	if c.scope != "" {
		v += `,scope=` + strconv.Quote(c.scope)
	}
	if errCode != "" && isTokenChar(errCode) {
		v += `,error="` + errCode + `"`
	}
	return v
}

func isTokenChar(s string) bool {
	for _, c := range s {
		if !(c == '_' || c == '-' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// WithClientChallenge marks r as coming from a client that does not use ns=, so 401s
// relayed to it carry cove-cache's challenge (see RewriteChallenge).
func (b *Broker) WithClientChallenge(r *http.Request, req *route.Request) *http.Request {
	c := &clientChallenge{realm: b.Realm(r)}
	if req.Kind != route.KindPing {
		c.scope = "repository:" + req.Name + ":pull"
		switch {
		case r.Method == http.MethodDelete && req.Kind != route.KindUpload:
			c.scope = "repository:" + req.Name + ":delete" // content management: what the origin asks for it
		case r.Method != http.MethodGet && r.Method != http.MethodHead:
			c.scope += ",push" // a push: the token must carry push for this repository
		}
	}
	return r.WithContext(context.WithValue(r.Context(), clientChallengeKey{}, c))
}

// RewriteChallenge replaces the origin's challenge on a 401 for a client that does not
// use ns= (see WithClientChallenge).
func RewriteChallenge(r *http.Request, h http.Header) {
	c, ok := r.Context().Value(clientChallengeKey{}).(*clientChallenge)
	if !ok {
		return
	}
	errCode := ""
	for _, ch := range auth.ParseAuthHeader(h) {
		if ch.Scheme == auth.BearerAuth {
			errCode = ch.Parameters["error"]
		}
	}
	h.Set("Www-Authenticate", c.header(errCode))
}

// Realm is the URL of cove-cache's token endpoint as this client reaches it.
func (b *Broker) Realm(r *http.Request) string {
	if b.externalURL != "" {
		return b.externalURL + Path
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host + Path
}
