package server

// Token brokering for clients that name the registry in the path.
//
// containerd names the origin with ns= and keeps the origin's repository names, so
// cove-cache relays the origin's challenges untouched and containerd fetches tokens from
// the origin's own token service. docker, crane and skopeo cannot add ns=: they name the
// registry as the first path element (/v2/ghcr.io/team/app/...) or not at all (the
// default registry), and they ask a token service for scopes in that naming
// (repository:ghcr.io/team/app:pull), which the origin's service does not know. So for
// those requests cove-cache is their token service:
//
//   - GET /v2/ without ns= answers 401 with a Bearer challenge whose realm is cove-cache's
//     /token, and every 401 such a client gets carries that challenge with the scope in
//     the client's naming;
//   - /token maps each scope to (registry, repository), binds the client's login to one
//     registry (credentials.go) and refuses scopes of any other, finds how the origin
//     authenticates (its own /v2/ challenge), and:
//     Bearer: asks the origin's token service for the same scopes in the origin's naming,
//     with the client's login, and returns its answer with the token wrapped in a cove
//     token bound to that registry;
//     Basic, or none: checks the login against the origin and returns a cove token
//     carrying it, bound to that registry.
//     A cove token is unwrapped on every request it comes back with, for its registry
//     only.
//
// cove-cache issues no authority of its own: every token is the origin's, or the
// client's own credentials, and every object is still authorized by the origin.

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker/auth"

	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/origin"
	"github.com/cove-oci/cove/proxy/route"
)

const (
	// TokenPath is where cove-cache serves its token endpoint.
	TokenPath = "/token"
	// coveTokenPrefix marks the tokens cove-cache issues itself (see coveToken).
	coveTokenPrefix = "cove1."
	// coveTokenService is the service named in cove-cache's challenges.
	coveTokenService = "cove"
	// Bounds on what a token request may carry and what an origin may answer.
	maxTokenScopes   = 16
	maxTokenResponse = 1 << 20
	// originChallengeTTL is how long an origin's /v2/ answer (how it authenticates) is
	// remembered: it changes only when the registry is reconfigured.
	originChallengeTTL = time.Minute
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

// withClientChallenge marks r as coming from a client that does not use ns=, so 401s
// relayed to it carry cove-cache's challenge.
func (s *Server) withClientChallenge(r *http.Request, req *route.Request) *http.Request {
	c := &clientChallenge{realm: s.tokenRealm(r)}
	if req.Kind != route.KindPing {
		c.scope = "repository:" + req.Name + ":pull"
	}
	return r.WithContext(context.WithValue(r.Context(), clientChallengeKey{}, c))
}

// rewriteChallenge replaces the origin's challenge on a 401 for a client that does not
// use ns= (see withClientChallenge).
func rewriteChallenge(r *http.Request, h http.Header) {
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

// tokenRealm is the URL of cove-cache's token endpoint as this client reaches it.
func (s *Server) tokenRealm(r *http.Request) string {
	if s.externalURL != "" {
		return s.externalURL + TokenPath
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host + TokenPath
}

// originAuth is how an origin authenticates, from its answer to an anonymous GET /v2/.
type originAuth struct {
	scheme  auth.AuthenticationScheme // 0: no authentication
	realm   string
	service string
	at      time.Time
}

type originAuths struct {
	mu sync.Mutex
	m  map[string]originAuth
}

// originAuth asks registry how it authenticates, or remembers its recent answer. A
// non-nil response is the origin's (or the policy's) refusal, to relay.
func (s *Server) originAuth(ctx context.Context, registry string) (originAuth, *http.Response, error) {
	s.auths.mu.Lock()
	a, ok := s.auths.m[registry]
	s.auths.mu.Unlock()
	if ok && time.Since(a.at) < originChallengeTTL {
		return a, nil, nil
	}
	resp, err := s.origin.Do(ctx, http.MethodGet, registry, "/v2/", nil, http.Header{}, nil)
	if err != nil {
		return originAuth{}, nil, err
	}
	a = originAuth{at: time.Now()}
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusUnauthorized:
		for _, ch := range auth.ParseAuthHeader(resp.Header) { // strongest scheme first
			if ch.Scheme == auth.BearerAuth && ch.Parameters["realm"] != "" {
				a.scheme, a.realm, a.service = auth.BearerAuth, ch.Parameters["realm"], ch.Parameters["service"]
				break
			}
			if ch.Scheme == auth.BasicAuth {
				a.scheme = auth.BasicAuth
				break
			}
		}
		if a.scheme == 0 {
			return originAuth{}, resp, nil
		}
	default:
		return originAuth{}, resp, nil
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	s.auths.mu.Lock()
	if len(s.auths.m) >= 10000 {
		clear(s.auths.m)
	}
	s.auths.m[registry] = a
	s.auths.mu.Unlock()
	return a, nil, nil
}

// serveToken is cove-cache's token endpoint (see the top of this file).
func (s *Server) serveToken(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		// 404, not 405: OAuth2 clients (POST) fall back to GET on 404, as the token
		// specification tells them to.
		s.metrics.Request("token", metrics.ResultInvalid)
		httpx.WriteError(w, http.StatusNotFound, "UNSUPPORTED", "cove-cache's token endpoint answers GET only")
		return
	}
	registry, scopes, query, err := parseTokenRequest(s.router, r.URL.RawQuery)
	if err != nil {
		s.metrics.Request("token", metrics.ResultInvalid)
		httpx.WriteError(w, http.StatusBadRequest, "UNSUPPORTED", err.Error())
		return
	}
	// The only credential a token request may carry is a login, and it is bound to one
	// registry before anything is sent anywhere (see credentials.go).
	client := ""
	if v := r.Header.Get("Authorization"); v != "" {
		l, ok, err := bindLogin(s.router, v)
		if !ok {
			err = tokenError("token requests authenticate with Basic credentials or none")
		}
		if err != nil {
			s.metrics.Request("token", metrics.ResultInvalid)
			httpx.WriteError(w, http.StatusBadRequest, "UNSUPPORTED", err.Error())
			return
		}
		if registry == "" { // a login check: no scope
			registry = l.registry
		}
		if registry != l.registry {
			s.metrics.Request("token", metrics.ResultDenied)
			httpx.WriteError(w, http.StatusForbidden, "DENIED", errLoginForAnotherRegistry(l.registry, registry).Error())
			return
		}
		client = l.authorization
		if query.Has("account") {
			query.Set("account", l.user)
		}
	}
	if registry == "" {
		registry, _, _ = s.router.SplitName("x") // an anonymous login check: the default registry
	}
	a, refusal, err := s.originAuth(r.Context(), registry)
	if err != nil {
		s.originUnavailable(w, &route.Request{Registry: registry}, "token", err)
		return
	}
	if refusal != nil {
		defer refusal.Body.Close()
		s.metrics.Request("token", resultForStatus(refusal.StatusCode))
		status := refusal.StatusCode
		if status < 400 {
			status = http.StatusBadGateway
		}
		relay(w, r, status, refusal.Header, nil)
		return
	}
	if a.scheme == auth.BearerAuth {
		s.relayOriginToken(w, r, registry, a, client, scopes, query)
		return
	}
	if client != "" {
		// Check the credentials now, so that a wrong password fails the login, not a
		// later pull.
		resp, err := s.origin.Do(r.Context(), http.MethodGet, registry, "/v2/", nil, http.Header{"Authorization": {client}}, nil)
		if err != nil {
			s.originUnavailable(w, &route.Request{Registry: registry}, "token", err)
			return
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			s.metrics.Request("token", resultForStatus(resp.StatusCode))
			httpx.WriteError(w, resp.StatusCode, errorCode(resp.StatusCode, ""), "origin registry "+registry+" refused these credentials")
			return
		}
	}
	s.metrics.Request("token", metrics.ResultPassthrough)
	tok := coveToken{Registry: registry, Authorization: client}.encode()
	writeTokenJSON(w, map[string]any{
		"token": tok, "access_token": tok, "expires_in": 3600, "issued_at": time.Now().UTC().Format(time.RFC3339),
	})
}

// parseTokenRequest validates a token request's query and maps its scopes to the origin's
// naming. All scopes must name repositories of one registry; with none (a login check),
// registry is empty. query keeps the parameters passed on to the origin's
// token service (account, client_id).
func parseTokenRequest(rt route.Router, rawQuery string) (registry string, scopes []string, query url.Values, err error) {
	if len(rawQuery) > 8<<10 {
		return "", nil, nil, tokenError("token request query longer than 8 KiB")
	}
	q, err := url.ParseQuery(rawQuery)
	if err != nil {
		return "", nil, nil, tokenError("malformed token request query")
	}
	for _, v := range q["scope"] {
		for _, sc := range strings.Fields(v) {
			if len(scopes) == maxTokenScopes {
				return "", nil, nil, tokenError("more than " + strconv.Itoa(maxTokenScopes) + " scopes")
			}
			reg, mapped, err := mapScope(rt, sc)
			if err != nil {
				return "", nil, nil, err
			}
			if registry != "" && reg != registry {
				return "", nil, nil, tokenError("scopes name repositories of more than one registry: ask for one registry at a time")
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
		return "", "", tokenError("unsupported scope: cove-cache brokers repository:<name>:<actions> scopes only")
	}
	name, actions := rest[:i], rest[i+1:]
	for _, a := range strings.Split(actions, ",") {
		if a == "" || !isTokenChar(a) && a != "*" {
			return "", "", tokenError("invalid actions in scope")
		}
	}
	registry, repo, err := rt.SplitName(name)
	if err != nil {
		return "", "", err
	}
	return registry, "repository:" + repo + ":" + actions, nil
}

// relayOriginToken asks the origin's token service for scopes with the client's
// credentials and relays the answer.
func (s *Server) relayOriginToken(w http.ResponseWriter, r *http.Request, registry string, a originAuth, client string, scopes []string, query url.Values) {
	u, err := url.Parse(a.realm)
	if err != nil {
		s.badOrigin(w, &route.Request{Registry: registry}, tokenError("origin named an invalid token realm"))
		return
	}
	q := u.Query()
	for k, v := range query {
		q[k] = v
	}
	if a.service != "" {
		q.Set("service", a.service)
	}
	for _, sc := range scopes {
		q.Add("scope", sc)
	}
	u.RawQuery = q.Encode()
	h := http.Header{"Accept": {"application/json"}}
	if client != "" {
		h.Set("Authorization", client)
	}
	resp, err := s.origin.Get(r.Context(), u.String(), h)
	if err != nil {
		s.originUnavailable(w, &route.Request{Registry: registry}, "token", err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		s.metrics.Request("token", resultForStatus(resp.StatusCode))
		status := resp.StatusCode
		if status != http.StatusUnauthorized && status != http.StatusForbidden && status != http.StatusBadRequest {
			status = http.StatusBadGateway
		}
		msg := "origin token service answered " + http.StatusText(resp.StatusCode)
		if rf := resp.Header.Get(origin.RefusedHeader); rf != "" {
			msg = rf
		}
		httpx.WriteError(w, status, errorCode(status, ""), msg)
		return
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxTokenResponse+1))
	if err == nil && len(body) > maxTokenResponse {
		err = tokenError("origin token service sent an answer over 1 MiB")
	}
	if err == nil {
		body, err = bindOriginTokens(registry, body)
	}
	if err != nil {
		s.badOrigin(w, &route.Request{Registry: registry}, err)
		return
	}
	s.metrics.Request("token", metrics.ResultPassthrough)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(body)
}

// bindOriginTokens rewrites an origin token service's answer so that the tokens in it
// (token, access_token) are cove tokens bound to registry: a client holding one can use
// it through cove-cache with that registry only, never have cove-cache present it to
// another. A refresh token is dropped (cove-cache asks for none and answers no POST).
func bindOriginTokens(registry string, body []byte) ([]byte, error) {
	var answer map[string]json.RawMessage
	if err := json.Unmarshal(body, &answer); err != nil {
		return nil, tokenError("origin token service sent an unreadable answer")
	}
	delete(answer, "refresh_token")
	n := 0
	for _, k := range []string{"token", "access_token"} {
		raw, ok := answer[k]
		if !ok {
			continue
		}
		var tok string
		if err := json.Unmarshal(raw, &tok); err != nil || tok == "" || !isCarriable("Bearer "+tok) {
			return nil, tokenError("origin token service sent an unusable " + k)
		}
		answer[k], _ = json.Marshal(coveToken{Registry: registry, Authorization: "Bearer " + tok}.encode())
		n++
	}
	if n == 0 {
		return nil, tokenError("origin token service sent no token")
	}
	return json.Marshal(answer)
}

func writeTokenJSON(w http.ResponseWriter, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(b)
}
