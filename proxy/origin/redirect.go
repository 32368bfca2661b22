package origin

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
)

// Registries answer blob reads with a redirect to object storage or a CDN, and the URL they
// name is often presigned: its query string (X-Amz-Signature, a SAS token, verify=...) is a
// credential for that object. net/http quotes the URL of the failing hop in every error it
// returns, and copies the previous hop's URL into Referer, so both are scrubbed here.

// maxRedirects is net/http's own default limit, kept now that the client has a CheckRedirect.
const maxRedirects = 10

// ErrRedirectDowngrade is the error of a redirect from https to plain http, refused unless
// the registry itself is reached over plain HTTP (WithPlainHTTP).
var ErrRedirectDowngrade = errors.New("origin redirect from https to plain http refused")

// errBadLocation replaces net/http's error for a redirect whose Location does not parse:
// that error quotes the whole header, query included.
var errBadLocation = errors.New("origin answered a redirect with an unparsable Location header")

// sensitiveHeaders carry the client's credentials for one registry: never sent to another
// host:port. (The list is net/http's own for redirects; it keeps them for subdomains and
// for another port on the same host, which are different servers as far as a credential is
// concerned.)
var sensitiveHeaders = []string{"Authorization", "Cookie", "Cookie2", "Proxy-Authorization", "Www-Authenticate"}

// registryKey carries the registry a request was sent for (send's argument) to checkRedirect.
type registryKey struct{}

func withRegistry(req *http.Request, registry string) *http.Request {
	return req.WithContext(context.WithValue(req.Context(), registryKey{}, registry))
}

// checkRedirect is the client's CheckRedirect; req's headers are already copied from the
// first request by net/http.
func (c *Client) checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) >= maxRedirects {
		return fmt.Errorf("stopped after %d redirects", maxRedirects)
	}
	prev := via[len(via)-1]
	registry, _ := req.Context().Value(registryKey{}).(string)
	if prev.URL.Scheme == "https" && req.URL.Scheme != "https" && !c.plainHTTP[registry] {
		// A plain-HTTP hop can be read and rewritten on the way: the blob would still be
		// verified by digest, but a token or presigned URL in it would not be private.
		return fmt.Errorf("%w (%s to %s)", ErrRedirectDowngrade, hostPort(prev.URL), hostPort(req.URL))
	}
	// net/http sets Referer to the previous hop's URL, presigned query included; no
	// registry or storage needs it.
	req.Header.Del("Referer")
	// Once the chain has left the first request's host:port, credentials stay behind, even
	// if a later hop comes back: that host chose where the chain goes next.
	first := hostPort(via[0].URL)
	for _, r := range append(via[1:len(via):len(via)], req) {
		if hostPort(r.URL) != first {
			for _, h := range sensitiveHeaders {
				req.Header.Del(h)
			}
			break
		}
	}
	return nil
}

// hostPort is u's lower-case host and port, the scheme's default port if none is given.
func hostPort(u *url.URL) string { return strings.ToLower(canonicalAddr(u)) }

// locationCheck fails a redirect whose Location does not parse before net/http does, so the
// error does not quote the header (see errBadLocation).
type locationCheck struct{ next http.RoundTripper }

func (t locationCheck) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	if err != nil {
		return resp, err
	}
	switch resp.StatusCode {
	case http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther, http.StatusTemporaryRedirect, http.StatusPermanentRedirect:
		if loc := resp.Header.Get("Location"); loc != "" {
			if _, perr := req.URL.Parse(loc); perr != nil {
				resp.Body.Close()
				return nil, errBadLocation
			}
		}
	}
	return resp, nil
}

// redactError strips the user information, query and fragment from the URL a *url.Error
// names (net/http returns one for every failed request, naming the failing hop: a redirect
// target's presigned URL, or the raw Location of a refused redirect). The wrapped error is
// kept, so errors.Is and Timeout still work.
func redactError(err error) error {
	var ue *url.Error
	if !errors.As(err, &ue) || ue.URL == "" {
		return err
	}
	// net/http returns the url.Error itself; were it wrapped, the outer text would quote it
	// too, so the redacted url.Error alone is returned either way.
	return &url.Error{Op: ue.Op, URL: redactURL(ue.URL), Err: ue.Err}
}

// redactURL is raw without user information, query or fragment (scheme, host and path stay:
// enough to tell which server and object failed).
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	u.User = nil
	u.RawQuery, u.ForceQuery = "", false
	u.Fragment, u.RawFragment = "", ""
	if u.Opaque != "" {
		// "scheme:opaque" keeps nothing readable we could vouch for.
		u.Opaque = "(opaque)"
	}
	return u.String()
}
