package origin

import (
	"errors"
	"net/http"
	"net/url"
)

// Registries answer blob reads with a redirect to object storage or a CDN, and the URL they
// name is often presigned: its query string (X-Amz-Signature, a SAS token, verify=...) is a
// credential for that object. net/http quotes the URL of the failing hop in every error it
// returns, so errors are scrubbed here.

// errBadLocation replaces net/http's error for a redirect whose Location does not parse:
// that error quotes the whole header, query included.
var errBadLocation = errors.New("origin answered a redirect with an unparsable Location header")

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
