package origin

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// RefusedError is the error of a dial the origin policy refused. Host is the host name
// the request named (a redirect's, for a redirect); Addr is the refused address.
type RefusedError struct {
	Host   string
	Addr   netip.Addr // invalid when refused by name, before any lookup
	Reason string
}

func (e *RefusedError) Error() string {
	if e.Addr.IsValid() {
		return fmt.Sprintf("origin policy refuses %s (%s address %s)", e.Host, e.Reason, e.Addr)
	}
	return fmt.Sprintf("origin policy refuses %s (%s)", e.Host, e.Reason)
}

// Pattern is one --origin-allow or --origin-deny rule: a host glob (optionally with a
// port) matched against the host name a request names, or a CIDR (or a single IP
// address) matched against the address actually dialled.
type Pattern struct {
	raw    string
	prefix netip.Prefix // valid: an address rule
	labels []string     // host glob, by label; a leading "**" matches one or more labels
	ip     string       // an address literal named with a port: matched as the host name
	port   string       // "" any port
}

func (p Pattern) String() string { return p.raw }

// ParsePattern parses a rule: "10.20.0.0/16", "fd00::/8", "10.1.2.3" (one address),
// "registry.local", "registry.local:5000", "*.corp.example", "[fd00::1]:5000". In a host
// glob, "*" matches within one label, except a leading "*." which matches one or more
// labels, and "*" alone, which matches every name (address literals included); a rule
// without a port matches every port.
func ParsePattern(s string) (Pattern, error) {
	raw := s
	s = strings.ToLower(strings.TrimSpace(s))
	if s == "" || len(s) > 255 {
		return Pattern{}, errors.New("empty or too long")
	}
	if strings.Contains(s, "/") {
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			return Pattern{}, fmt.Errorf("not a CIDR: %v", err)
		}
		return Pattern{raw: raw, prefix: unmapPrefix(pfx).Masked()}, nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		if a.Zone() != "" {
			return Pattern{}, errors.New("zoned addresses are not supported")
		}
		a = a.Unmap()
		return Pattern{raw: raw, prefix: netip.PrefixFrom(a, a.BitLen())}, nil
	}
	host, port := s, ""
	if h, p, err := net.SplitHostPort(s); err == nil {
		host, port = h, p
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 || strconv.Itoa(n) != port {
			return Pattern{}, fmt.Errorf("bad port %q", port)
		}
	} else if strings.ContainsAny(s, ":[]") {
		return Pattern{}, errors.New("want HOST, HOST:PORT or a CIDR")
	}
	if a, err := netip.ParseAddr(host); err == nil {
		if a.Zone() != "" {
			return Pattern{}, errors.New("zoned addresses are not supported")
		}
		// An address with a port is a name rule on the literal the request names.
		return Pattern{raw: raw, ip: a.Unmap().String(), port: port}, nil
	}
	if strings.HasPrefix(s, "[") {
		return Pattern{}, errors.New("bracketed host is not an IPv6 address")
	}
	labels := strings.Split(host, ".")
	for i, l := range labels {
		if l == "" {
			return Pattern{}, errors.New("empty label in host")
		}
		for _, c := range l {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '*') {
				return Pattern{}, fmt.Errorf("character %q not allowed in a host glob", c)
			}
		}
		if i == 0 && l == "*" { // "*.x": one or more labels; "*" alone: every name
			labels[0] = "**"
		}
	}
	return Pattern{raw: raw, labels: labels, port: port}, nil
}

func unmapPrefix(p netip.Prefix) netip.Prefix {
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		return netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p
}

// IsAddr reports whether the rule matches addresses (CIDR) rather than host names.
func (p Pattern) IsAddr() bool { return p.prefix.IsValid() }

// matchName reports whether a name rule matches host (lower case, no brackets) and port.
func (p Pattern) matchName(host, port string) bool {
	if p.prefix.IsValid() || (p.port != "" && p.port != port) {
		return false
	}
	if p.ip != "" {
		return p.ip == host
	}
	labels := strings.Split(host, ".")
	pl := p.labels
	if pl[0] == "**" {
		if len(labels) < len(pl) {
			return false
		}
		labels = labels[len(labels)-len(pl)+1:]
		pl = pl[1:]
	}
	if len(labels) != len(pl) {
		return false
	}
	for i := range pl {
		if !globLabel(pl[i], labels[i]) {
			return false
		}
	}
	return true
}

func (p Pattern) matchAddr(a netip.Addr) bool { return p.prefix.IsValid() && p.prefix.Contains(a) }

// globLabel matches one label against a pattern in which '*' matches any run of characters.
func globLabel(pat, s string) bool {
	// Iterative wildcard match: linear in practice, no recursion.
	px, sx, starP, starS := 0, 0, -1, 0
	for sx < len(s) {
		switch {
		case px < len(pat) && pat[px] == '*':
			starP, starS = px, sx
			px++
		case px < len(pat) && pat[px] == s[sx]:
			px++
			sx++
		case starP >= 0:
			starS++
			px, sx = starP+1, starS
		default:
			return false
		}
	}
	for px < len(pat) && pat[px] == '*' {
		px++
	}
	return px == len(pat)
}

// PolicyConfig is what a Policy is built from.
type PolicyConfig struct {
	// Allow lets these origins through the defaults (host globs or CIDRs); a host glob
	// never lifts the metadata and link-local refusals, which only an address rule does.
	Allow []string
	// Deny refuses these origins, whatever Allow says.
	Deny []string
	// Self lists cove-cache's own listen addresses (HOST:PORT); an unspecified host
	// (0.0.0.0, ::) stands for every address of this machine's interfaces.
	Self []string
	// Resolve replaces the DNS lookup (tests). It returns every address of host.
	Resolve func(ctx context.Context, host string) ([]netip.Addr, error)
}

// Policy decides which origins cove-cache may contact. Every dial is checked against the
// address actually dialled, so DNS rebinding and redirects cannot lead elsewhere.
type Policy struct {
	allow, deny []Pattern
	self        map[netip.AddrPort]bool
	resolve     func(ctx context.Context, host string) ([]netip.Addr, error)
}

// NewPolicy builds a Policy.
func NewPolicy(cfg PolicyConfig) (*Policy, error) {
	p := &Policy{self: map[netip.AddrPort]bool{}, resolve: cfg.Resolve}
	for _, s := range cfg.Allow {
		r, err := ParsePattern(s)
		if err != nil {
			return nil, fmt.Errorf("origin allow rule %q: %w", s, err)
		}
		p.allow = append(p.allow, r)
	}
	for _, s := range cfg.Deny {
		r, err := ParsePattern(s)
		if err != nil {
			return nil, fmt.Errorf("origin deny rule %q: %w", s, err)
		}
		p.deny = append(p.deny, r)
	}
	for _, s := range cfg.Self {
		if err := p.addSelf(s); err != nil {
			return nil, fmt.Errorf("self address %q: %w", s, err)
		}
	}
	if p.resolve == nil {
		p.resolve = func(ctx context.Context, host string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		}
	}
	return p, nil
}

// addSelf records a listen address: HOST:PORT, where HOST may be a name (looked up once),
// an address, or unspecified/empty for every address of this machine. Port 0 (picked at
// listen time) is not known here and is skipped.
func (p *Policy) addSelf(hostport string) error {
	host, portStr, err := net.SplitHostPort(hostport)
	if err != nil {
		return err
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return fmt.Errorf("bad port %q", portStr)
	}
	if port == 0 {
		return nil
	}
	var addrs []netip.Addr
	if a, err := netip.ParseAddr(host); err == nil {
		addrs = []netip.Addr{a}
	} else if host == "" {
		addrs = []netip.Addr{netip.IPv6Unspecified()}
	} else if addrs, err = net.DefaultResolver.LookupNetIP(context.Background(), "ip", host); err != nil {
		return err
	}
	for _, a := range addrs {
		if a = a.Unmap().WithZone(""); !a.IsUnspecified() {
			p.self[netip.AddrPortFrom(a, uint16(port))] = true
			continue
		}
		ifaddrs, err := net.InterfaceAddrs()
		if err != nil {
			return fmt.Errorf("listing interface addresses: %w", err)
		}
		for _, ia := range ifaddrs {
			if n, ok := ia.(*net.IPNet); ok {
				if a, ok := netip.AddrFromSlice(n.IP); ok {
					p.self[netip.AddrPortFrom(a.Unmap(), uint16(port))] = true
				}
			}
		}
	}
	return nil
}

// withAllowed returns a copy of p that also allows these registries (HOST:PORT) by name
// and port: the --origin-plain-http hosts.
func (p *Policy) withAllowed(hosts []string) *Policy {
	q := *p
	q.allow = append([]Pattern(nil), p.allow...)
	for _, h := range hosts {
		if r, err := ParsePattern(h); err == nil {
			q.allow = append(q.allow, r)
		}
	}
	return &q
}

// check decides one (host name, port, dialled address). It returns "" to allow, or the
// reason to refuse.
func (p *Policy) check(host, port string, a netip.Addr) string {
	a = a.Unmap().WithZone("")
	for _, r := range p.deny {
		if r.matchName(host, port) || r.matchAddr(a) {
			return ReasonDenied
		}
	}
	reason := Classify(a)
	// An address literal with a port names the very address dialled; a host name does not
	// (see nameCannotLift): only an address rule reaches metadata or link-local addresses.
	nameLifts := func(r Pattern) bool {
		return r.matchName(host, port) && (r.ip != "" || !nameCannotLift(reason))
	}
	if n, err := strconv.Atoi(port); err == nil && p.self[netip.AddrPortFrom(a, uint16(n))] {
		// Only a rule naming this very host and port lets cove-cache call itself.
		for _, r := range p.allow {
			if r.port != "" && nameLifts(r) {
				return ""
			}
		}
		return ReasonSelf
	}
	for _, r := range p.allow {
		if r.matchAddr(a) || nameLifts(r) {
			return ""
		}
	}
	return reason
}

// splitAddr splits a dial address into a lower-case host (no brackets, no zone) and port.
func splitAddr(addr string) (host, port string, err error) {
	host, port, err = net.SplitHostPort(addr)
	if err != nil {
		return "", "", err
	}
	if a, err := netip.ParseAddr(host); err == nil {
		return a.Unmap().String(), port, nil
	}
	return strings.ToLower(strings.TrimSuffix(host, ".")), port, nil
}

// deniedName refuses a registry (HOST or HOST:PORT, as the client named it) by the deny
// rules' names, before anything is looked up: "--origin-deny docker.io" refuses Docker Hub
// although its API host is registry-1.docker.io.
func (p *Policy) deniedName(registry string) *RefusedError {
	if p == nil {
		return nil
	}
	addr := registry
	if _, _, err := net.SplitHostPort(addr); err != nil {
		addr = net.JoinHostPort(strings.Trim(addr, "[]"), "443")
	}
	host, port, err := splitAddr(addr)
	if err != nil {
		return nil
	}
	for _, r := range p.deny {
		if r.matchName(host, port) {
			return &RefusedError{Host: host, Reason: ReasonDenied}
		}
	}
	return nil
}

// vet resolves addr's host and checks every address it resolves to: one refused address
// refuses the whole name (a rebinding name answering a public and a private address gets
// neither). It returns the checked addresses and the port.
func (p *Policy) vet(ctx context.Context, addr string) ([]netip.Addr, string, error) {
	host, port, err := splitAddr(addr)
	if err != nil {
		return nil, "", err
	}
	for _, r := range p.deny {
		if r.matchName(host, port) {
			return nil, "", &RefusedError{Host: host, Reason: ReasonDenied}
		}
	}
	var addrs []netip.Addr
	if a, err := netip.ParseAddr(host); err == nil {
		addrs = []netip.Addr{a}
	} else if addrs, err = p.resolve(ctx, host); err != nil {
		return nil, "", err
	}
	if len(addrs) == 0 {
		return nil, "", &net.DNSError{Err: "no addresses", Name: host, IsNotFound: true}
	}
	for _, a := range addrs {
		if reason := p.check(host, port, a); reason != "" {
			return nil, "", &RefusedError{Host: host, Addr: a.Unmap().WithZone(""), Reason: reason}
		}
	}
	return addrs, port, nil
}

// DialContext wraps d: it vets addr, then dials only the checked addresses, so what is
// dialled is what was checked (no second lookup a rebinding name could answer otherwise).
func (p *Policy) DialContext(d *net.Dialer) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		addrs, port, err := p.vet(ctx, addr)
		if err != nil {
			return nil, err
		}
		var firstErr error
		for _, a := range addrs {
			conn, err := d.DialContext(ctx, network, net.JoinHostPort(a.Unmap().String(), port))
			if err == nil {
				return conn, nil
			}
			if firstErr == nil {
				firstErr = err
			}
			if ctx.Err() != nil {
				break
			}
		}
		return nil, firstErr
	}
}

// policyTransport returns the default transport with every dial checked by p. Requests
// through an HTTP proxy (HTTPS_PROXY and friends) dial the proxy, which the operator
// chose; their origin is vetted by name and lookup before the proxy is asked (the proxy's
// own lookup is beyond cove-cache's reach).
func policyTransport(p *Policy) *http.Transport {
	t := NewTransport()
	d := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
	checked := p.DialContext(d)
	var proxies sync.Map // dial addresses of the proxies in use
	t.Proxy = func(req *http.Request) (*url.URL, error) {
		u, err := http.ProxyFromEnvironment(req)
		if err != nil || u == nil {
			return u, err
		}
		if _, _, err := p.vet(req.Context(), canonicalAddr(req.URL)); err != nil {
			return nil, err
		}
		proxies.Store(canonicalAddr(u), true)
		return u, nil
	}
	t.DialContext = bulkDial(func(ctx context.Context, network, addr string) (net.Conn, error) {
		if _, ok := proxies.Load(addr); ok {
			return d.DialContext(ctx, network, addr)
		}
		return checked(ctx, network, addr)
	})
	return t
}

func canonicalAddr(u *url.URL) string {
	port := u.Port()
	if port == "" {
		switch u.Scheme {
		case "http":
			port = "80"
		case "socks5", "socks5h":
			port = "1080"
		default:
			port = "443"
		}
	}
	return net.JoinHostPort(u.Hostname(), port)
}

// vettingTransport applies a Policy in front of a transport it does not build (WithTransport):
// every request, redirects included, is vetted by name and lookup. The dial itself is the
// wrapped transport's, so this is weaker than the default transport's dial-time check.
type vettingTransport struct {
	policy *Policy
	next   http.RoundTripper
}

func (t vettingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if _, _, err := t.policy.vet(req.Context(), canonicalAddr(req.URL)); err != nil {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, err
	}
	return t.next.RoundTrip(req)
}
