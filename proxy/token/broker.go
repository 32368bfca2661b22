// Package token is cove-cache's token service for clients that name the registry in the
// path, and the binding of their credentials to one registry.
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
package token

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker/auth"
	"github.com/containerd/errdefs"

	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/origin"
	"github.com/cove-oci/cove/proxy/route"
)

const (
	// Path is where cove-cache serves its token endpoint.
	Path = "/token"
	// coveTokenPrefix marks the tokens cove-cache hands out (see coveToken).
	coveTokenPrefix = "cove1."
	// coveTokenService is the service named in cove-cache's challenges.
	coveTokenService = "cove"
	// maxTokenResponse bounds what an origin's token service may answer.
	maxTokenResponse = 1 << 20
	// originChallengeTTL is how long an origin's /v2/ answer (how it authenticates) is
	// remembered: it changes only when the registry is reconfigured.
	originChallengeTTL = time.Minute
)

// Config configures a Broker.
type Config struct {
	Router route.Router
	Origin *origin.Client
	// Metrics counts token requests and refused credentials.
	Metrics *metrics.Metrics
	Logger  *slog.Logger
	// ExternalURL is cove-cache's URL as clients reach it, for the realm; empty: the
	// request's own scheme and Host.
	ExternalURL string
}

// Broker serves the token endpoint and binds credentials (credentials.go).
type Broker struct {
	router      route.Router
	origin      *origin.Client
	metrics     *metrics.Metrics
	log         *slog.Logger
	externalURL string
	auths       originAuths
}

// New returns a Broker.
func New(cfg Config) *Broker {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Broker{
		router:      cfg.Router,
		origin:      cfg.Origin,
		metrics:     cfg.Metrics,
		log:         cfg.Logger,
		externalURL: strings.TrimSuffix(cfg.ExternalURL, "/"),
		auths:       originAuths{m: map[string]originAuth{}},
	}
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
func (b *Broker) originAuth(ctx context.Context, registry string) (originAuth, *http.Response, error) {
	b.auths.mu.Lock()
	a, ok := b.auths.m[registry]
	b.auths.mu.Unlock()
	if ok && time.Since(a.at) < originChallengeTTL {
		return a, nil, nil
	}
	resp, err := b.origin.Do(ctx, http.MethodGet, registry, "/v2/", nil, http.Header{}, nil)
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
	b.auths.mu.Lock()
	if len(b.auths.m) >= 10000 {
		clear(b.auths.m)
	}
	b.auths.m[registry] = a
	b.auths.mu.Unlock()
	return a, nil, nil
}

// ServeHTTP is cove-cache's token endpoint (see the package documentation).
func (b *Broker) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		// 404, not 405: OAuth2 clients (POST) fall back to GET on 404, as the token
		// specification tells them to.
		b.metrics.Request("token", metrics.ResultInvalid)
		httpx.WriteError(w, http.StatusNotFound, "UNSUPPORTED", "cove-cache's token endpoint answers GET only")
		return
	}
	registry, scopes, query, err := parseTokenRequest(b.router, r.URL.RawQuery)
	if err != nil {
		b.metrics.Request("token", metrics.ResultInvalid)
		httpx.WriteErr(w, err)
		return
	}
	// The only credential a token request may carry is a login, and it is bound to one
	// registry before anything is sent anywhere (see credentials.go).
	client := ""
	if v := r.Header.Get("Authorization"); v != "" && !isEmptyBasic(v) {
		l, ok, err := bindLogin(b.router, v)
		if !ok {
			err = invalidRequest("token requests authenticate with Basic credentials or none")
		}
		if err != nil {
			b.metrics.Request("token", metrics.ResultInvalid)
			httpx.WriteErr(w, err)
			return
		}
		if registry == "" { // a login check: no scope
			registry = l.registry
		}
		if registry != l.registry {
			b.metrics.Request("token", metrics.ResultDenied)
			httpx.WriteErr(w, errLoginForAnotherRegistry(l.registry, registry))
			return
		}
		client = l.authorization
		if query.Has("account") {
			query.Set("account", l.user)
		}
	}
	if registry == "" {
		registry, _, _ = b.router.SplitName("x") // an anonymous login check: the default registry
	}
	a, refusal, err := b.originAuth(r.Context(), registry)
	if err != nil {
		b.originUnavailable(w, registry, err)
		return
	}
	if refusal != nil {
		defer refusal.Body.Close()
		b.metrics.Request("token", metrics.ResultForStatus(refusal.StatusCode))
		status := refusal.StatusCode
		if status < 400 {
			status = http.StatusBadGateway
		}
		httpx.CopyRelayed(w.Header(), refusal.Header)
		if status == http.StatusUnauthorized {
			RewriteChallenge(r, w.Header())
		}
		msg := "origin registry answered " + http.StatusText(refusal.StatusCode)
		if rf := refusal.Header.Get(origin.RefusedHeader); rf != "" {
			msg = rf // the origin policy, not the origin, said no
		}
		httpx.WriteError(w, status, httpx.ErrorCode(status, ""), msg)
		return
	}
	if a.scheme == auth.BearerAuth {
		b.relayOriginToken(w, r, registry, a, client, scopes, query)
		return
	}
	if client != "" {
		// Check the credentials now, so that a wrong password fails the login, not a
		// later pull.
		resp, err := b.origin.Do(r.Context(), http.MethodGet, registry, "/v2/", nil, http.Header{"Authorization": {client}}, nil)
		if err != nil {
			b.originUnavailable(w, registry, err)
			return
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.metrics.Request("token", metrics.ResultForStatus(resp.StatusCode))
			httpx.WriteError(w, resp.StatusCode, httpx.ErrorCode(resp.StatusCode, ""), "origin registry "+registry+" refused these credentials")
			return
		}
	}
	b.metrics.Request("token", metrics.ResultPassthrough)
	tok := coveToken{Registry: registry, Authorization: client}.encode()
	writeTokenJSON(w, map[string]any{
		"token": tok, "access_token": tok, "expires_in": 3600, "issued_at": time.Now().UTC().Format(time.RFC3339),
	})
}

// relayOriginToken asks the origin's token service for scopes with the client's
// credentials and relays the answer.
func (b *Broker) relayOriginToken(w http.ResponseWriter, r *http.Request, registry string, a originAuth, client string, scopes []string, query url.Values) {
	u, err := url.Parse(a.realm)
	if err != nil {
		b.badOrigin(w, registry, badAnswer("origin named an invalid token realm"))
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
	resp, err := b.origin.Get(r.Context(), u.String(), h)
	if err != nil {
		b.originUnavailable(w, registry, err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b.metrics.Request("token", metrics.ResultForStatus(resp.StatusCode))
		status := resp.StatusCode
		if status != http.StatusUnauthorized && status != http.StatusForbidden && status != http.StatusBadRequest {
			status = http.StatusBadGateway
		}
		msg := "origin token service answered " + http.StatusText(resp.StatusCode)
		if rf := resp.Header.Get(origin.RefusedHeader); rf != "" {
			msg = rf
		}
		httpx.WriteError(w, status, httpx.ErrorCode(status, ""), msg)
		return
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxTokenResponse+1))
	if err == nil && len(body) > maxTokenResponse {
		err = badAnswer("origin token service sent an answer over 1 MiB")
	}
	if err == nil {
		body, err = bindOriginTokens(registry, body)
	}
	if err != nil {
		b.badOrigin(w, registry, err)
		return
	}
	b.metrics.Request("token", metrics.ResultPassthrough)
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
		return nil, badAnswer("origin token service sent an unreadable answer")
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
			return nil, badAnswer("origin token service sent an unusable " + k)
		}
		answer[k], _ = json.Marshal(coveToken{Registry: registry, Authorization: "Bearer " + tok}.encode())
		n++
	}
	if n == 0 {
		return nil, badAnswer("origin token service sent no token")
	}
	return json.Marshal(answer)
}

func writeTokenJSON(w http.ResponseWriter, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(b)
}

// badAnswer is an origin answer the broker cannot use.
func badAnswer(text string) error { return &httpx.Message{Class: errdefs.ErrUnknown, Text: text} }

// originUnavailable answers when the origin could not be asked; the client may retry.
func (b *Broker) originUnavailable(w http.ResponseWriter, registry string, err error) {
	b.log.Warn("origin unreachable", "registry", registry, "operation", "token", "error", err)
	b.metrics.Request("token", metrics.ResultError)
	httpx.WriteError(w, http.StatusBadGateway, "UNAVAILABLE", "origin registry "+registry+" could not be reached")
}

// badOrigin answers when the origin's token service answered something unusable.
func (b *Broker) badOrigin(w http.ResponseWriter, registry string, err error) {
	b.log.Warn("origin token answer rejected", "registry", registry, "error", err)
	b.metrics.Request("token", metrics.ResultError)
	httpx.WriteError(w, http.StatusBadGateway, "UNKNOWN", "origin registry sent an invalid token answer")
}
