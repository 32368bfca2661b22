// Package origin is cove-cache's HTTP client for origin registries.
package origin

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/cove-oci/cove/proxy/httpx"
	"github.com/cove-oci/cove/proxy/route"
)

// Client sends distribution API requests to origin registries.
type Client struct {
	http      *http.Client
	plainHTTP map[string]bool
	observe   func(registry string, status int, err error)
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
	return func(c *Client) { c.http.Transport = rt }
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
		DialContext: (&net.Dialer{
			Timeout:   10 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
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
// extra headers (Range) are added on top.
func (c *Client) Do(ctx context.Context, method, registry, path string, query url.Values, clientHeader http.Header, extra http.Header) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.URL(registry, path, query), nil)
	if err != nil {
		return nil, fmt.Errorf("build origin request: %w", err)
	}
	req.Header = httpx.OriginRequestHeaders(clientHeader)
	for k, v := range extra {
		req.Header[k] = v
	}
	resp, err := c.http.Do(req)
	if c.observe != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		c.observe(registry, status, err)
	}
	if err != nil {
		// The url.Error names the URL, which holds no credentials (they travel in headers).
		return nil, err
	}
	return resp, nil
}
