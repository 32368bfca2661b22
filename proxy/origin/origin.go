// Package origin is cove-cache's HTTP client for origin registries.
package origin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/route"
)

// Client sends distribution API requests to origin registries.
type Client struct {
	http      *http.Client
	plainHTTP map[string]bool
	observe   func(registry string, status int, err error)
	refused   func(registry string, err *RefusedError)
	policy    *Policy
	custom    bool // the transport came from WithTransport
}

// Option configures a Client.
type Option func(*Client)

// WithPlainHTTP lets the client reach these registries (host:port) over plain HTTP, for
// local test registries; every other registry is reached over HTTPS.
func WithPlainHTTP(hosts ...string) Option {
	return func(c *Client) {
		for _, h := range hosts {
			c.plainHTTP[h] = true
		}
	}
}

// WithTransport replaces the HTTP transport (tests, custom CAs).
func WithTransport(rt http.RoundTripper) Option {
	return func(c *Client) { c.http.Transport = rt; c.custom = true }
}

// WithPolicy checks every origin dial against p (see Policy). The registries given to
// WithPlainHTTP are allowed by name and port on top of p's rules. Without it, the client
// contacts any origin. With WithTransport, the policy vets each request (redirects
// included) by name and lookup instead of checking the dial itself.
func WithPolicy(p *Policy) Option {
	return func(c *Client) { c.policy = p }
}

// WithRefused is called for every request the policy refused (nothing was fetched).
func WithRefused(fn func(registry string, err *RefusedError)) Option {
	return func(c *Client) { c.refused = fn }
}

// WithObserver is called after every origin request with its status or error.
func WithObserver(fn func(registry string, status int, err error)) Option {
	return func(c *Client) { c.observe = fn }
}

// NewTransport is the default transport: bounded connect and header waits, and no
// transparent decompression (a decoded body would not match its digest).
func NewTransport() *http.Transport {
	return &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: bulkDial((&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext),
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: 60 * time.Second,
		ExpectContinueTimeout: time.Second,
		DisableCompression:    true,
	}
}

// New returns a Client.
func New(opts ...Option) *Client {
	c := &Client{
		http:      &http.Client{Transport: NewTransport()},
		plainHTTP: map[string]bool{},
	}
	for _, o := range opts {
		o(c)
	}
	if c.policy != nil {
		hosts := make([]string, 0, len(c.plainHTTP))
		for h := range c.plainHTTP {
			hosts = append(hosts, h)
		}
		p := c.policy.withAllowed(hosts)
		c.policy = p
		if c.custom {
			c.http.Transport = vettingTransport{policy: p, next: c.http.Transport}
		} else {
			c.http.Transport = policyTransport(p)
		}
	}
	c.http.Transport = locationCheck{next: c.http.Transport}
	c.http.CheckRedirect = c.checkRedirect
	return c
}

// PlainHTTP reports whether registry is reached over plain HTTP.
func (c *Client) PlainHTTP(registry string) bool { return c.plainHTTP[registry] }

// URL builds the origin URL of a distribution API path (starting with /v2/).
func (c *Client) URL(registry, path string, query url.Values) string {
	u := url.URL{Scheme: "https", Host: route.APIHost(registry), Path: path}
	if c.plainHTTP[registry] {
		u.Scheme = "http"
	}
	if len(query) > 0 {
		u.RawQuery = query.Encode()
	}
	return u.String()
}

// Do sends one request to registry. clientHeader is the client's request header, from
// which only credentials and Accept are forwarded (see httpx.OriginRequestHeaders);
// extra headers (Range) are added on top. A request the policy refuses (WithPolicy), at
// any redirect, is answered by a synthetic 403 with a DENIED error naming the policy, and
// a nil error: nothing was fetched, and callers relay it like an origin's refusal.
func (c *Client) Do(ctx context.Context, method, registry, path string, query url.Values, clientHeader http.Header, extra http.Header) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.URL(registry, path, query), nil)
	if err != nil {
		return nil, fmt.Errorf("build origin request: %w", err)
	}
	req.Header = httpx.OriginRequestHeaders(clientHeader)
	for k, v := range extra {
		req.Header[k] = v
	}
	return c.send(req, registry)
}

// Get fetches an absolute http(s) URL the origin named, such as the realm of its token
// service, under the same policy as every registry request. header is sent as given.
func (c *Client) Get(ctx context.Context, rawURL string, header http.Header) (*http.Response, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil {
		// The URL came from the origin: quoted redacted, like every URL in an error.
		return nil, fmt.Errorf("origin URL %q: want an absolute http or https URL without user information", redactURL(rawURL))
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("build origin request: %w", err)
	}
	req.Header = header.Clone()
	if req.Header == nil {
		req.Header = http.Header{}
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), map[string]string{"http": "80", "https": "443"}[u.Scheme])
	}
	return c.send(req, host)
}

// send runs one request to host (the registry, or another server an origin named) under
// the policy, counting it for the observer. Its error never names a URL's query or user
// information (see redactError).
func (c *Client) send(req *http.Request, registry string) (*http.Response, error) {
	var resp *http.Response
	var err error
	if rerr := c.policy.deniedName(registry); rerr != nil {
		err = rerr
	} else {
		resp, err = c.http.Do(withRegistry(req, registry))
		err = redactError(err)
	}
	if refused := (*RefusedError)(nil); errors.As(err, &refused) {
		// Nothing was fetched: answer as a registry refusing the request would, so every
		// caller relays a 403 DENIED naming the policy (and never the refused address).
		if c.refused != nil {
			c.refused(registry, refused)
		}
		return refusedResponse(req, registry, refused.Reason), nil
	}
	if c.observe != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		c.observe(registry, status, err)
	}
	if err != nil {
		// A response returned with an error (a refused redirect) has its body closed.
		return nil, err
	}
	return resp, nil
}

// refusedResponse is the answer to a request the origin policy refused.
// RefusedHeader carries the policy's message on a refused response, so a caller that
// relays only the status of a HEAD can still say why. It is never sent to clients
// (httpx.RelayedResponseHeaders does not list it).
const RefusedHeader = "Cove-Origin-Refused"

func refusedResponse(req *http.Request, registry, reason string) *http.Response {
	msg := "cove-cache's origin policy refuses to contact registry " + registry + " (" + reason + " address)"
	if reason == ReasonDenied {
		msg = "cove-cache's origin policy refuses to contact registry " + registry + " (an --origin-deny rule)"
	}
	if reason == ReasonSelf {
		msg = "cove-cache's origin policy refuses to contact registry " + registry + " (cove-cache itself)"
	}
	body, _ := json.Marshal(map[string]any{"errors": []map[string]string{{"code": "DENIED", "message": msg}}})
	h := http.Header{}
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set(RefusedHeader, msg)
	return &http.Response{
		Status:        "403 Forbidden",
		StatusCode:    http.StatusForbidden,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        h,
		Body:          io.NopCloser(strings.NewReader(string(body))),
		ContentLength: int64(len(body)),
		Request:       req,
	}
}

// Send is Do for requests that carry a body (pushes): body is sent with length bytes
// (-1: unknown, chunked), and rawQuery is passed as given (an upload URL's state, which
// the origin chose and which is never logged). path must be a distribution API path:
// the scheme and host are always the registry's own (URL), whatever the caller was told.
func (c *Client) Send(ctx context.Context, method, registry, path, rawQuery string, clientHeader, extra http.Header, body io.Reader, length int64) (*http.Response, error) {
	if !strings.HasPrefix(path, "/v2/") {
		return nil, fmt.Errorf("origin request: not a distribution API path")
	}
	u, err := url.Parse(c.URL(registry, path, nil))
	if err != nil {
		return nil, fmt.Errorf("build origin request: %w", err)
	}
	u.RawQuery = rawQuery
	req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
	if err != nil {
		return nil, fmt.Errorf("build origin request: %w", err)
	}
	if body == nil || length == 0 {
		req.Body, req.ContentLength = http.NoBody, 0
	} else {
		req.ContentLength = length
		req.GetBody = nil // a streamed body cannot be sent twice: no redirect is followed with it
	}
	req.Header = httpx.OriginRequestHeaders(clientHeader)
	for k, v := range extra {
		req.Header[k] = v
	}
	return c.send(req, registry)
}
