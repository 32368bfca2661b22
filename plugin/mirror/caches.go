package mirror

import (
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cove-oci/cove/plugin/breaker"
	"github.com/cove-oci/cove/proxy/cluster"
	"github.com/cove-oci/cove/proxy/route"
)

// Which cove-cache a request goes to (docs/scaleout.md). Replicas of one cove-cache
// agree on an owner for every digest by rendezvous hashing over their member URLs; a
// replica that misses a blob it does not own fetches it from the owner, a second hop.
// cove-node ranks the caches it knows by the same function and key, so a blob request
// goes to its owner first and, when the owner is bypassed (breaker open) or fails, to the
// next in rank: the replica every other replica would move to. Requests without a digest
// (a manifest by tag, a ping) are ranked by their repository, which spreads them over the
// replicas and keeps one repository's on one replica.

// Cache sources (CacheStatus.Source).
const (
	SourceFlag    = "flag"    // Config.Caches
	SourceMembers = "members" // Config.Members
)

// CacheStatus is one cove-cache this node sends requests to now.
type CacheStatus struct {
	URL      string
	Source   string // SourceFlag or SourceMembers
	Bypassed bool   // its circuit breaker is open
}

// cacheSet is the caches a request may go to: the members of Config.Members, ranked per
// request, then the Config.Caches not among them (a Service URL: the way in while the
// members are unknown or all bypassed), ranked among themselves.
type cacheSet struct {
	static []*cacheEndpoint

	mu      sync.Mutex
	members []*cacheEndpoint // sorted by member
}

// memberName is the string a cache URL is ranked by: cluster.ParseMember's form, the
// one a replica hashes its --advertise-url in, so both rank the same strings. A URL
// without a port (it cannot be a replica's member URL) is ranked as written, lower-cased.
func memberName(base string) string {
	if m, err := cluster.ParseMember(base); err == nil {
		return m
	}
	return strings.ToLower(base)
}

// rankKey is what a request's cache is chosen by: its digest, the key the replicas' ring
// uses for a blob's owner (proxy/server/peer.go), or else its registry and repository.
func rankKey(req *route.Request) string {
	if req.Digest != "" {
		return req.Digest.String()
	}
	return req.Registry + "/" + req.Repository
}

// rankCaches orders eps by rendezvous rank of key, owner first. One cache, or none, is
// left as it is.
func rankCaches(eps []*cacheEndpoint, key string) []*cacheEndpoint {
	if len(eps) < 2 {
		return eps
	}
	byName := make(map[string]*cacheEndpoint, len(eps))
	names := make([]string, 0, len(eps))
	for _, ep := range eps {
		if _, dup := byName[ep.member]; !dup {
			byName[ep.member] = ep
			names = append(names, ep.member)
		}
	}
	out := make([]*cacheEndpoint, 0, len(names))
	for _, n := range cluster.Rank(names, key) {
		out = append(out, byName[n])
	}
	return out
}

// cachesFor returns the caches to try for req, in order.
func (h *Handler) cachesFor(req *route.Request) []*cacheEndpoint {
	return h.cachesForKey(rankKey(req))
}

func (h *Handler) cachesForKey(key string) []*cacheEndpoint {
	h.set.mu.Lock()
	members := h.set.members
	h.set.mu.Unlock()
	if len(members) == 0 {
		return rankCaches(h.set.static, key)
	}
	out := rankCaches(members, key)
	var rest []*cacheEndpoint
	for _, ep := range h.set.static {
		if !slices.ContainsFunc(members, func(m *cacheEndpoint) bool { return m.member == ep.member }) {
			rest = append(rest, ep)
		}
	}
	return append(slices.Clone(out), rankCaches(rest, key)...)
}

// allCaches is every cache in use now: members, then the static ones.
func (h *Handler) allCaches() []*cacheEndpoint {
	h.set.mu.Lock()
	defer h.set.mu.Unlock()
	return append(slices.Clone(h.set.members), h.set.static...)
}

// Caches reports the caches requests go to now, with their source and breaker state.
func (h *Handler) Caches() []CacheStatus {
	var out []CacheStatus
	for _, ep := range h.allCaches() {
		out = append(out, CacheStatus{URL: ep.base, Source: ep.source, Bypassed: ep.breaker.Open()})
	}
	return out
}

// newEndpoint builds the client, health probe and breaker of one cache, and starts its
// background health check (stopped by ep.close or Handler.Close).
func (h *Handler) newEndpoint(base, source string) *cacheEndpoint {
	cfg := &h.cfg
	rt := cfg.Transport
	var own *http.Transport
	if rt == nil {
		own = &http.Transport{
			DialContext:         (&net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
			TLSHandshakeTimeout: 2 * time.Second,
			TLSClientConfig:     cfg.TLSConfig.Clone(), // nil stays nil
		}
		rt = own
	}
	client := &http.Client{
		Transport: rt,
		// The cache answers for itself; a redirect is not something to follow blindly.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	probe := breaker.HealthProbe(client, base+"/healthz")
	ep := &cacheEndpoint{base: base, member: memberName(base), source: source, client: client, probe: probe,
		transport: own, stop: make(chan struct{})}
	ep.breaker = breaker.New(probe, append([]breaker.Option{breaker.WithOnChange(func(open bool) {
		if open {
			h.log.Warn("cove-cache unhealthy: requests go to the next cache or the origin", "cache", base)
		} else {
			h.log.Info("cove-cache back", "cache", base)
		}
	})}, h.breakerOpts...)...)
	if cfg.ProbeInterval > 0 {
		go h.monitor(ep)
	}
	return ep
}

// close stops ep's health check and drops its idle connections; requests in flight on
// it finish.
func (ep *cacheEndpoint) close() {
	ep.closeOnce.Do(func() {
		close(ep.stop)
		if ep.transport != nil {
			ep.transport.CloseIdleConnections()
		}
	})
}

// followMembers keeps the member caches equal to Config.Members until the handler closes.
func (h *Handler) followMembers() {
	for {
		changed := h.cfg.Members.Changed()
		h.setMembers(h.cfg.Members.Members())
		select {
		case <-changed:
		case <-h.stop:
			return
		}
	}
}

// setMembers makes urls the member caches: endpoints of members that stay are kept
// (their breakers and connections with them), new ones are built, gone ones closed.
func (h *Handler) setMembers(urls []string) {
	next := map[string]bool{}
	for _, u := range urls {
		base := strings.TrimRight(u, "/")
		if !strings.HasPrefix(base, "http://") && !strings.HasPrefix(base, "https://") {
			h.log.Warn("member is not an http(s) URL: left out", "member", u)
			continue
		}
		next[base] = true
	}
	h.set.mu.Lock()
	var kept, gone []*cacheEndpoint
	have := map[string]bool{}
	for _, ep := range h.set.members {
		if next[ep.base] {
			kept = append(kept, ep)
			have[ep.base] = true
		} else {
			gone = append(gone, ep)
		}
	}
	for base := range next {
		if !have[base] {
			kept = append(kept, h.newEndpoint(base, SourceMembers))
		}
	}
	slices.SortFunc(kept, func(a, b *cacheEndpoint) int { return strings.Compare(a.member, b.member) })
	changed := len(gone) > 0 || len(kept) != len(h.set.members)
	h.set.members = kept
	h.set.mu.Unlock()
	for _, ep := range gone {
		ep.close()
	}
	if changed {
		var list []string
		for _, ep := range kept {
			list = append(list, ep.base)
		}
		attrs := []any{"members", list}
		if len(list) == 0 {
			attrs = append(attrs, "using", h.cfg.Caches)
		}
		h.log.Info("cove-cache members changed", attrs...)
	}
}
