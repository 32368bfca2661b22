package token

// Which registry a client's credential is for.
//
// A client that names the registry with ns= (containerd) authenticates with each origin
// as that origin's own challenge tells it, and cove-cache relays what it sends to that
// origin only. docker and crane do not use ns=: they hold one credential per host, so a
// login to cove-cache is a single credential for every registry behind it. cove-cache
// therefore binds each such login to one registry, named in the user name:
//
//   - "<registry>/<user>" (the first element a host with a dot, or localhost, with an
//     optional port) is a login for <registry> as <user>;
//   - a plain "<user>" is a login for the default registry (--default-registry, else
//     Docker Hub, as an unqualified image name is).
//
// The credential reaches that registry (with the registry taken off the user name) and
// the token realm that registry names, never another: a token request or a pull naming
// another registry is refused before anything is sent. Tokens cove-cache hands out (the
// origin's tokens, and for Basic origins the credential itself) are wrapped in a cove
// token bound to the same registry, and a cove token presented for any other registry
// is refused.

import (
	"encoding/base64"
	"encoding/json"
	"net"
	"net/http"
	"strings"

	"golang.org/x/net/http/httpguts"

	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/metrics"
	"github.com/cove-oci/cove/proxy/route"
)

var errMalformedToken = httpx.Unauthenticated("malformed cove-cache token")

// login is a Basic credential bound to one registry (see the top of this file).
type login struct {
	registry      string // canonical registry host the login is for
	user          string // the user name as that registry knows it
	authorization string // the Basic header to send to that registry
}

// bindLogin reads the Basic credential of an Authorization value. ok is false when v is
// not a Basic credential, or an empty one; err is set when it is one that cannot be read.
func bindLogin(rt route.Router, v string) (l login, ok bool, err error) {
	scheme, cred, found := strings.Cut(v, " ")
	if !found || !strings.EqualFold(scheme, "Basic") {
		return login{}, false, nil
	}
	if isEmptyBasic(v) {
		return login{}, false, nil
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(cred))
	if err != nil {
		return login{}, true, httpx.InvalidArgument("malformed Basic credential")
	}
	user, password, err := splitLogin(rt, string(raw), &l)
	if err != nil {
		return login{}, true, err
	}
	if user == "" {
		return login{}, true, httpx.InvalidArgument("empty user name")
	}
	l.user = user
	l.authorization = "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+password))
	return l, true, nil
}

// isEmptyBasic reports whether v is a Basic credential with no user and no password:
// what some clients (the OCI conformance suite) send when they have none. It is
// anonymous, not a login.
func isEmptyBasic(v string) bool {
	scheme, cred, found := strings.Cut(v, " ")
	return found && strings.EqualFold(scheme, "Basic") && strings.TrimSpace(cred) == base64.StdEncoding.EncodeToString([]byte(":"))
}

// splitLogin splits a decoded Basic credential into user and password, setting
// l.registry from the user name. A registry's port holds a colon, which RFC 7617 keeps
// out of user names, so a leading "<host>[:port]/" is read before the colon that ends
// the user name; the host must have a dot or be localhost (or a bracketed address),
// so that a plain user's password holding a slash is not taken for a registry.
func splitLogin(rt route.Router, raw string, l *login) (user, password string, err error) {
	if first, rest, found := strings.Cut(raw, "/"); found && strings.Contains(rest, ":") && looksLikeRegistry(first) {
		if l.registry, err = route.NormalizeHost(first); err != nil {
			return "", "", httpx.InvalidArgument("the user name names an invalid registry host")
		}
		user, password, _ = strings.Cut(rest, ":")
		return user, password, nil
	}
	user, password, found := strings.Cut(raw, ":")
	if !found {
		return "", "", httpx.InvalidArgument("malformed Basic credential")
	}
	if l.registry, _, err = rt.SplitName("x"); err != nil {
		return "", "", err
	}
	return user, password, nil
}

// looksLikeRegistry reports whether the first element of a user name names a registry.
func looksLikeRegistry(first string) bool {
	host := first
	if h, _, err := net.SplitHostPort(first); err == nil {
		host = h
	}
	return strings.Contains(host, ".") || host == "localhost" || strings.HasPrefix(first, "[")
}

// errLoginForAnotherRegistry is the refusal of a login used for a registry it is not
// bound to. It names the login's registry, never the user or the credential.
func errLoginForAnotherRegistry(bound, wanted string) error {
	return httpx.PermissionDenied("this login is for registry " + bound + ", not " + wanted +
		": log in to cove-cache as " + wanted + "/<user> to pull from it (see docs/security.md)")
}

// coveToken is the content of a token cove-cache hands out: the Authorization header to
// send to Registry ("" for anonymous), usable only with that registry. It is the
// origin's own bearer token or, for origins with Basic authentication, the login
// itself. It is not signed: whoever holds it holds nothing but what it carries, which
// works at that registry alone.
type coveToken struct {
	Registry      string `json:"r"`
	Authorization string `json:"a,omitempty"`
}

func (t coveToken) encode() string {
	b, _ := json.Marshal(t)
	return coveTokenPrefix + base64.RawURLEncoding.EncodeToString(b)
}

// decodeCoveToken parses the bearer token of an Authorization header. ok is false when
// the header carries no cove token; err is set when it carries a malformed one.
func decodeCoveToken(h http.Header) (tok coveToken, ok bool, err error) {
	v := h.Get("Authorization")
	scheme, token, found := strings.Cut(v, " ")
	if !found || !strings.EqualFold(scheme, "Bearer") || !strings.HasPrefix(token, coveTokenPrefix) {
		return coveToken{}, false, nil
	}
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(token, coveTokenPrefix))
	if err != nil {
		return coveToken{}, true, errMalformedToken
	}
	if err := json.Unmarshal(b, &tok); err != nil || tok.Registry == "" || !isCarriable(tok.Authorization) {
		return coveToken{}, true, errMalformedToken
	}
	return tok, true, nil
}

// isCarriable reports whether an Authorization value may be carried in a cove token:
// none, a well-formed Basic credential, or a well-formed bearer token that is not
// itself a cove token.
func isCarriable(v string) bool {
	if v == "" {
		return true
	}
	scheme, cred, ok := strings.Cut(v, " ")
	if !ok || cred == "" || strings.ContainsAny(cred, " \t") || !httpguts.ValidHeaderFieldValue(v) {
		return false
	}
	switch {
	case strings.EqualFold(scheme, "Basic"):
		return true
	case strings.EqualFold(scheme, "Bearer"):
		return !strings.HasPrefix(cred, coveTokenPrefix)
	}
	return false
}

// BindCredential is where a request's credential is bound to the registry it names.
// A cove token is replaced by what it carries, if it was issued for req.Registry; a
// login sent directly by a client that does not use ns= is used only for the registry
// it is bound to, without the registry in its user name. Otherwise it answers 401
// itself and returns false.
func (b *Broker) BindCredential(w http.ResponseWriter, r *http.Request, req *route.Request) bool {
	tok, ok, err := decodeCoveToken(r.Header)
	if ok {
		if err == nil && tok.Registry != req.Registry {
			err = httpx.Unauthenticated("cove-cache token issued for another registry")
		}
		if err != nil {
			b.refuseCredential(w, r, req, err)
			return false
		}
		setAuthorization(r, tok.Authorization)
		return true
	}
	if req.ViaNamespace {
		return true // the client names the origin itself and answers its challenges
	}
	l, ok, err := bindLogin(b.router, r.Header.Get("Authorization"))
	if !ok {
		return true
	}
	if err == nil && l.registry != req.Registry {
		err = errLoginForAnotherRegistry(l.registry, req.Registry)
	}
	if err != nil {
		b.refuseCredential(w, r, req, err)
		return false
	}
	setAuthorization(r, l.authorization)
	return true
}

// refuseCredential answers 401 invalid_token with cove-cache's challenge, so the client
// fetches a new token (or reports the message).
func (b *Broker) refuseCredential(w http.ResponseWriter, r *http.Request, req *route.Request, err error) {
	b.metrics.Request(req.Kind.String(), metrics.ResultDenied)
	c, ok := r.Context().Value(clientChallengeKey{}).(*clientChallenge)
	if !ok { // an ns= client sent a cove token: still point it at cove-cache's realm
		c = &clientChallenge{realm: b.Realm(r)}
	}
	w.Header().Set("Www-Authenticate", c.header("invalid_token"))
	httpx.WriteError(w, http.StatusUnauthorized, "UNAUTHORIZED", err.Error())
}

// setAuthorization replaces r's Authorization header (in place: r is the handler's own
// copy of the request) with v, or removes it when v is empty.
func setAuthorization(r *http.Request, v string) {
	r.Header = r.Header.Clone()
	if v == "" {
		r.Header.Del("Authorization")
	} else {
		r.Header.Set("Authorization", v)
	}
}
