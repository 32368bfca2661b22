package token

import (
	"net/url"
	"strconv"
	"strings"

	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/route"
)

// Bounds on what a token request may carry.
const maxTokenScopes = 16

func invalidRequest(text string) error { return httpx.InvalidArgument(text) }

// parseTokenRequest validates a token request's query and maps its scopes to the origin's
// naming. All scopes must name repositories of one registry; with none (a login check),
// registry is empty. query keeps the parameters passed on to the origin's
// token service (account, client_id).
func parseTokenRequest(rt route.Router, rawQuery string) (registry string, scopes []string, query url.Values, err error) {
	if len(rawQuery) > 8<<10 {
		return "", nil, nil, invalidRequest("token request query longer than 8 KiB")
	}
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return "", nil, nil, invalidRequest("malformed token request query")
	}
	for _, v := range q["scope"] {
		for _, sc := range strings.Fields(v) {
			if len(scopes) == maxTokenScopes {
				return "", nil, nil, invalidRequest("more than " + strconv.Itoa(maxTokenScopes) + " scopes")
			}
			reg, mapped, err := mapScope(rt, sc)
			if err != nil {
				return "", nil, nil, err
			}
			if registry != "" && reg != registry {
				return "", nil, nil, invalidRequest("scopes name repositories of more than one registry: ask for one registry at a time")
			}
			registry = reg
			scopes = append(scopes, mapped)
		}
	}
	// offline_token is not passed on: a refresh token is spent with POST, which this
	// endpoint does not answer, so clients keep their credentials and use GET instead.
	query = url.Values{}
	for _, k := range []string{"account", "client_id"} {
		if v := q.Get(k); v != "" {
			query.Set(k, v)
		}
	}
	return registry, scopes, query, nil
}

// mapScope turns repository:<client name>:<actions> into the origin's
// repository:<repository>:<actions>, with the registry it belongs to.
func mapScope(rt route.Router, scope string) (registry, mapped string, err error) {
	typ, rest, ok := strings.Cut(scope, ":")
	i := strings.LastIndexByte(rest, ':')
	if !ok || i < 0 || typ != "repository" {
		return "", "", invalidRequest("unsupported scope: cove-cache brokers repository:<name>:<actions> scopes only")
	}
	name, actions := rest[:i], rest[i+1:]
	for _, a := range strings.Split(actions, ",") {
		if a == "" || !isTokenChar(a) && a != "*" {
			return "", "", invalidRequest("invalid actions in scope")
		}
	}
	registry, repo, err := rt.SplitName(name)
	if err != nil {
		return "", "", err
	}
	return registry, "repository:" + repo + ":" + actions, nil
}
