package peers

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker/auth"
)

// TokenAdmin is the user of a TokenService who may push and pull every repository
// (PushRandomImage pushes as this user with WithPushAuth).
const TokenAdmin = "admin"

// TokenService is a Docker-spec token service ("Token Authentication Specification" of
// the distribution project), a test fixture on 127.0.0.1 that a registry started with
// WithTokenAuth trusts. Its policy is fixed:
//
//   - anyone, anonymous included, may pull public/*;
//   - user U (any user given to StartTokenService but TokenAdmin) may pull and push U/*,
//     so team-a may pull and push team-a/app and nothing of team-b's (a tenant with push
//     rights to its own repositories, as attack tests need);
//   - TokenAdmin may do everything it asks for (push, pull, delete, *) on every
//     repository.
//
// A request with wrong credentials gets 401; a request for repositories the user may
// not read still gets a token, granting only what the policy allows (the spec's
// behaviour: the registry then answers 401 insufficient_scope).
//
// Tokens are ES256 JWTs whose header carries the signing certificate as x5c; the
// certificate is self-signed and is the registry's whole rootcertbundle, which is
// exactly what distribution v3's registry/auth/token verifies (x5c chain against the
// bundle, then iss, aud = service, exp/nbf).
type TokenService struct {
	// URL is http://127.0.0.1:PORT; Realm is http://localhost:PORT/token, the
	// challenge's realm (see StartTokenService for why localhost).
	URL, Realm string
	// Service is the registry's service name (the token's audience); Issuer its iss.
	Service, Issuer string
	// CertBundle is the PEM file of the signing certificate (rootcertbundle).
	CertBundle string
	// Lifetime is a token's exp less its iat (and its expires_in, at least 0); zero is
	// 5 minutes. It may be negative: distribution accepts a token until RegistryTokenLeeway
	// after its exp, so a token a registry refuses 3 s after it was issued has Lifetime
	// 3s - RegistryTokenLeeway (see AcceptedFor). Set it before the first token request.
	Lifetime time.Duration

	key     *ecdsa.PrivateKey
	certDER []byte
	users   map[string]string
	srv     *httptest.Server

	mu     sync.Mutex
	issued []TokenIssue
}

// RegistryTokenLeeway is the clock skew distribution v3 allows a token past its exp
// (registry/auth/token, Leeway: fixed, not configurable).
const RegistryTokenLeeway = 60 * time.Second

// AcceptedFor makes the tokens issued from now on ones a distribution registry accepts for
// d after they are issued, and refuses after (401): their exp is d - RegistryTokenLeeway
// from issue. Tests of fills that outlive their credential use seconds.
func (s *TokenService) AcceptedFor(d time.Duration) {
	s.mu.Lock()
	s.Lifetime = d - RegistryTokenLeeway
	s.mu.Unlock()
}

// TokenIssue is one token request the service answered, as a test wants to see it.
type TokenIssue struct {
	Method    string   // GET, or POST (OAuth2 password grant, containerd's first try)
	User      string   // "" for anonymous
	Service   string   // the service parameter as sent
	Requested []string // scopes as requested, e.g. "repository:team-a/app:pull"
	Granted   []string // scopes granted, same form; empty when nothing was
	Status    int      // 200, or 401 for bad credentials, 400 for a bad request
	Token     string   // the JWT issued ("" unless Status is 200)
}

// StartTokenService starts the token service with the given users (name -> password)
// and stops it at cleanup. Include TokenAdmin to be able to push.
func StartTokenService(t testing.TB, users map[string]string) *TokenService {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		t.Fatalf("peers: token key: %v", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "cove-test-token-signer"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(crand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatalf("peers: token cert: %v", err)
	}
	bundle := filepath.Join(t.TempDir(), "token-root.pem")
	if err := os.WriteFile(bundle, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatalf("peers: %v", err)
	}
	s := &TokenService{
		Service:    "cove-test-registry",
		Issuer:     "cove-test-token-service",
		CertBundle: bundle,
		key:        key,
		certDER:    der,
		users:      map[string]string{},
	}
	for u, p := range users {
		s.users[u] = p
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("peers: %v", err)
	}
	s.srv = &httptest.Server{Listener: ln, Config: &http.Server{Handler: http.HandlerFunc(s.serve)}}
	s.srv.Start()
	s.URL = s.srv.URL
	// The realm names the host "localhost", not 127.0.0.1: go-containerregistry (which
	// PushRandomImage uses) refuses a realm that is a loopback or private IP literal
	// other than the registry's own host:port (transport/bearer.go, validateRealmURL).
	s.Realm = "http://localhost:" + strconv.Itoa(ln.Addr().(*net.TCPAddr).Port) + "/token"
	t.Cleanup(s.srv.Close)
	return s
}

// Issued returns every token request answered so far, oldest first.
func (s *TokenService) Issued() []TokenIssue {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.issued)
}

// Tokens returns every JWT issued so far (for asserting none leaks into logs).
func (s *TokenService) Tokens() []string {
	var out []string
	for _, i := range s.Issued() {
		if i.Token != "" {
			out = append(out, i.Token)
		}
	}
	return out
}

func (s *TokenService) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/token" {
		http.NotFound(w, r)
		return
	}
	issue := TokenIssue{Method: r.Method}
	var user, pass string
	var hasCreds bool
	switch r.Method {
	case http.MethodGet:
		q := r.URL.Query()
		issue.Service = q.Get("service")
		for _, sc := range q["scope"] {
			issue.Requested = append(issue.Requested, strings.Fields(sc)...)
		}
		user, pass, hasCreds = r.BasicAuth()
	case http.MethodPost:
		if err := r.ParseForm(); err != nil {
			s.fail(w, &issue, http.StatusBadRequest, "bad form")
			return
		}
		issue.Service = r.PostForm.Get("service")
		for _, sc := range r.PostForm["scope"] {
			issue.Requested = append(issue.Requested, strings.Fields(sc)...)
		}
		if r.PostForm.Get("grant_type") != "password" {
			// No refresh tokens here: the client falls back to GET on 400.
			s.fail(w, &issue, http.StatusBadRequest, "unsupported grant_type")
			return
		}
		user, pass, hasCreds = r.PostForm.Get("username"), r.PostForm.Get("password"), true
	default:
		s.fail(w, &issue, http.StatusMethodNotAllowed, "method")
		return
	}
	if hasCreds {
		want, ok := s.users[user]
		if !ok || want != pass {
			issue.User = user
			w.Header().Set("WWW-Authenticate", `Basic realm="cove-test-token"`)
			s.fail(w, &issue, http.StatusUnauthorized, "bad credentials")
			return
		}
		issue.User = user
	}
	if issue.Service != s.Service {
		s.fail(w, &issue, http.StatusBadRequest, "unknown service")
		return
	}
	type access struct {
		Type    string   `json:"type"`
		Name    string   `json:"name"`
		Actions []string `json:"actions"`
	}
	grants := []access{}
	for _, sc := range issue.Requested {
		typ, name, actions, ok := parseScope(sc)
		if !ok {
			continue
		}
		var allowed []string
		for _, a := range actions {
			if s.allows(issue.User, typ, name, a) {
				allowed = append(allowed, a)
			}
		}
		if len(allowed) > 0 {
			grants = append(grants, access{Type: typ, Name: name, Actions: allowed})
			issue.Granted = append(issue.Granted, typ+":"+name+":"+strings.Join(allowed, ","))
		}
	}
	now := time.Now()
	s.mu.Lock()
	life := s.Lifetime
	s.mu.Unlock()
	if life == 0 {
		life = 5 * time.Minute
	}
	var jti [16]byte
	_, _ = crand.Read(jti[:])
	claims := map[string]any{
		"iss":    s.Issuer,
		"sub":    issue.User,
		"aud":    s.Service,
		"exp":    now.Add(life).Unix(),
		"nbf":    now.Add(-time.Second).Unix(),
		"iat":    now.Unix(),
		"jti":    fmt.Sprintf("%x", jti),
		"access": grants,
	}
	tok, err := s.sign(claims)
	if err != nil {
		s.fail(w, &issue, http.StatusInternalServerError, err.Error())
		return
	}
	issue.Status, issue.Token = http.StatusOK, tok
	s.record(issue)
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"token":        tok,
		"access_token": tok,
		"expires_in":   int(max(life, 0).Round(time.Second) / time.Second),
		"issued_at":    now.UTC().Format(time.RFC3339),
	})
}

func (s *TokenService) fail(w http.ResponseWriter, issue *TokenIssue, status int, msg string) {
	issue.Status = status
	s.record(*issue)
	http.Error(w, msg, status)
}

func (s *TokenService) record(i TokenIssue) {
	s.mu.Lock()
	s.issued = append(s.issued, i)
	s.mu.Unlock()
}

// allows is the policy.
func (s *TokenService) allows(user, typ, name, action string) bool {
	if user == TokenAdmin {
		return true
	}
	if typ != "repository" {
		return false
	}
	if action == "pull" && strings.HasPrefix(name, "public/") {
		return true
	}
	return (action == "pull" || action == "push") && user != "" && strings.HasPrefix(name, user+"/")
}

// parseScope splits "repository:team-a/app:pull,push" (the name may hold a port colon
// for other resource types, so the actions are after the last colon). A type with a
// class, "repository(plugin)", is reduced to its type.
func parseScope(sc string) (typ, name string, actions []string, ok bool) {
	first := strings.Index(sc, ":")
	last := strings.LastIndex(sc, ":")
	if first < 0 || last <= first {
		return "", "", nil, false
	}
	typ, name = sc[:first], sc[first+1:last]
	if i := strings.Index(typ, "("); i >= 0 {
		typ = typ[:i]
	}
	for _, a := range strings.Split(sc[last+1:], ",") {
		if a != "" {
			actions = append(actions, a)
		}
	}
	return typ, name, actions, name != "" && len(actions) > 0
}

// sign makes a compact ES256 JWS with the certificate in x5c.
func (s *TokenService) sign(claims map[string]any) (string, error) {
	kid := sha256.Sum256(s.certDER)
	header := map[string]any{
		"typ": "JWT",
		"alg": "ES256",
		"x5c": []string{base64.StdEncoding.EncodeToString(s.certDER)},
		"kid": base64.RawURLEncoding.EncodeToString(kid[:]),
	}
	hb, err := json.Marshal(header)
	if err != nil {
		return "", err
	}
	cb, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	input := base64.RawURLEncoding.EncodeToString(hb) + "." + base64.RawURLEncoding.EncodeToString(cb)
	sum := sha256.Sum256([]byte(input))
	r, sv, err := ecdsa.Sign(crand.Reader, s.key, sum[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	sv.FillBytes(sig[32:])
	return input + "." + base64.RawURLEncoding.EncodeToString(sig), nil
}

// FetchToken does the client side of the flow, as a registry client would after a 401
// with a Bearer challenge: GET realm?service=..&scope=.. with basic credentials (none
// when user is ""). It returns the token.
func FetchToken(challenge, user, password string) (string, error) {
	params, ok := ParseBearerChallenge(challenge)
	if !ok {
		return "", fmt.Errorf("not a Bearer challenge: %q", challenge)
	}
	req, err := http.NewRequest(http.MethodGet, params["realm"], nil)
	if err != nil {
		return "", err
	}
	q := req.URL.Query()
	if v := params["service"]; v != "" {
		q.Set("service", v)
	}
	if v := params["scope"]; v != "" {
		q.Set("scope", v)
	}
	req.URL.RawQuery = q.Encode()
	if user != "" {
		req.SetBasicAuth(user, password)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("token service: %s", resp.Status)
	}
	var body struct {
		Token       string `json:"token"`
		AccessToken string `json:"access_token"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return "", err
	}
	if body.Token == "" {
		body.Token = body.AccessToken
	}
	return body.Token, nil
}

// ParseBearerChallenge returns the parameters of the Bearer challenge in a
// WWW-Authenticate value, parsed by containerd's own parser.
func ParseBearerChallenge(h string) (map[string]string, bool) {
	for _, c := range auth.ParseAuthHeader(http.Header{"Www-Authenticate": {h}}) {
		if c.Scheme == auth.BearerAuth && c.Parameters["realm"] != "" {
			return c.Parameters, true
		}
	}
	return nil, false
}
