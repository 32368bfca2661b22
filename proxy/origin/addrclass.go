package origin

import (
	"net/netip"

	"code.dny.dev/ssrf"
)

// Reasons an origin is refused: the values of cove_origin_refused_total's reason label.
// The set is fixed, so the label stays bounded whatever clients send.
const (
	ReasonDenied      = "denied"      // an --origin-deny rule matched
	ReasonSelf        = "self"        // cove-cache's own listen address
	ReasonLoopback    = "loopback"    // 127.0.0.0/8, ::1
	ReasonPrivate     = "private"     // RFC 1918, 100.64.0.0/10, fc00::/7, fec0::/10, 64:ff9b:1::/48
	ReasonLinkLocal   = "link-local"  // 169.254.0.0/16, fe80::/10
	ReasonMetadata    = "metadata"    // cloud instance metadata endpoints
	ReasonUnspecified = "unspecified" // 0.0.0.0/8, ::
	ReasonMulticast   = "multicast"   // 224.0.0.0/4, ff00::/8, broadcast
	ReasonReserved    = "reserved"    // every other special-purpose address (IANA registries)
)

// The labelled classes below are ours: the label says why. Everything else that is not an
// ordinary public address is left to the maintained IANA special-purpose tables of
// code.dny.dev/ssrf (documentation, benchmarking, AS112, 6to4 and Teredo, IPv6 outside
// 2000::/3, ...), whose refusal we report as "reserved".
var (
	metadataAddrs = []netip.Addr{
		netip.MustParseAddr("169.254.169.254"), // AWS, GCP, Azure, OpenStack, ...
		netip.MustParseAddr("169.254.170.2"),   // AWS ECS task metadata
		netip.MustParseAddr("100.100.100.200"), // Alibaba Cloud
		netip.MustParseAddr("fd00:ec2::254"),   // AWS over IPv6
	}
	privatePrefixes = []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/16"),
		netip.MustParsePrefix("100.64.0.0/10"), // CGNAT
		netip.MustParsePrefix("fc00::/7"),      // ULA
		netip.MustParsePrefix("fec0::/10"),     // deprecated site-local
	}
	// special refuses what the IANA special-purpose registries set aside. Its ports and
	// networks are not used (SafeAddr checks the address only).
	special = ssrf.New(ssrf.WithAnyPort(), ssrf.WithAnyNetwork())
)

// IPv6 forms that carry an IPv4 address: what they reach is decided by that address, so a
// loopback, private or metadata IPv4 address must not pass as a public IPv6 one.
var (
	ipv4Compatible = netip.MustParsePrefix("::/96")           // ::a.b.c.d (deprecated, RFC 4291)
	ipv4Translated = netip.MustParsePrefix("::ffff:0:0:0/96") // ::ffff:0:a.b.c.d (SIIT, RFC 2765)
	nat64WellKnown = netip.MustParsePrefix("64:ff9b::/96")    // RFC 6052
	nat64LocalUse  = netip.MustParsePrefix("64:ff9b:1::/48")  // RFC 8215: an operator's own NAT64
	sixToFour      = netip.MustParsePrefix("2002::/16")       // RFC 3056: the IPv4 is bits 16-47
	teredo         = netip.MustParsePrefix("2001::/32")       // RFC 4380
)

// Classify returns the default refusal reason for an address, or "" for a public one.
// IPv4-mapped addresses and IPv6 forms embedding an IPv4 address are judged by the IPv4
// address they carry (see classifyEmbedded).
func Classify(a netip.Addr) string {
	a = a.Unmap().WithZone("")
	if !a.IsValid() {
		return ReasonUnspecified
	}
	if a.Is6() {
		if reason, ok := classifyEmbedded(a); ok {
			return reason
		}
	}
	return classifyOne(a)
}

// classifyEmbedded judges an IPv6 address that carries an IPv4 one. ok is false when a is
// no such form, or when the IPv4 address is public and the form itself is left to
// classifyOne (6to4, Teredo and IPv4-compatible addresses are then still refused as
// reserved: deprecated transition forms no registry needs).
func classifyEmbedded(a netip.Addr) (reason string, ok bool) {
	b := a.As16()
	v4 := func(i, j, k, l int) netip.Addr { return netip.AddrFrom4([4]byte{b[i], b[j], b[k], b[l]}) }
	switch {
	case a == netip.IPv6Unspecified() || a == netip.IPv6Loopback():
		return "", false // in ::/96, but not IPv4-compatible addresses
	case nat64WellKnown.Contains(a):
		// How IPv6-only clusters reach IPv4 registries: the IPv4 address alone decides,
		// and a public one is allowed.
		return classifyOne(v4(12, 13, 14, 15)), true
	case nat64LocalUse.Contains(a):
		// The operator's own translator, with a prefix between /48 and /96 in this block
		// that we cannot know: the IPv4 address may sit at any of RFC 6052's positions
		// for those lengths (bits 64-71 are skipped). Private, which only an allow rule
		// lifts; metadata or link-local if any position holds such an address, so that
		// a host-name rule cannot lift it (the other positions hold whatever the rest of
		// the address is, so their own class means nothing).
		reason = ReasonPrivate
		for _, c := range []netip.Addr{v4(6, 7, 9, 10), v4(7, 9, 10, 11), v4(9, 10, 11, 12), v4(12, 13, 14, 15)} {
			if r := classifyOne(c); nameCannotLift(r) {
				reason = worse(reason, r)
			}
		}
		return reason, true
	case ipv4Compatible.Contains(a), ipv4Translated.Contains(a):
		reason = classifyOne(v4(12, 13, 14, 15))
	case sixToFour.Contains(a):
		reason = classifyOne(v4(2, 3, 4, 5))
	case teredo.Contains(a):
		// Bits 32-63 are the Teredo server; bits 96-127, inverted, the client's public
		// address, where a relay sends the packets.
		client := netip.AddrFrom4([4]byte{^b[12], ^b[13], ^b[14], ^b[15]})
		reason = worse(classifyOne(v4(4, 5, 6, 7)), classifyOne(client))
	}
	return reason, reason != ""
}

// classifyOne classifies one address as it is, embedding nothing.
func classifyOne(a netip.Addr) string {
	for _, m := range metadataAddrs {
		if a == m {
			return ReasonMetadata
		}
	}
	switch {
	case a.IsLoopback():
		return ReasonLoopback
	case a.IsUnspecified() || (a.Is4() && a.As4()[0] == 0):
		return ReasonUnspecified
	case a.IsLinkLocalUnicast():
		return ReasonLinkLocal
	case a.IsMulticast() || a.IsLinkLocalMulticast() || a.IsInterfaceLocalMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return ReasonMulticast
	}
	for _, p := range privatePrefixes {
		if p.Contains(a) {
			return ReasonPrivate
		}
	}
	if special.SafeAddr(a) != nil {
		return ReasonReserved
	}
	return ""
}

// severity orders the reasons an address can get from Classify, worst first: metadata
// and link-local are the ones a host-name allow rule cannot lift (see Policy.check).
var severity = map[string]int{
	ReasonMetadata:    1,
	ReasonLinkLocal:   2,
	ReasonLoopback:    3,
	ReasonUnspecified: 4,
	ReasonMulticast:   5,
	ReasonPrivate:     6,
	ReasonReserved:    7,
}

// worse returns the worse of two reasons ("" is the best: public).
func worse(r1, r2 string) string {
	if r1 == "" || (r2 != "" && severity[r2] < severity[r1]) {
		return r2
	}
	return r1
}

// nameCannotLift reports whether reason is one a host-name allow rule does not lift: a
// name is not the address it resolves to (whoever answers its lookup picks that), and
// these addresses hand out credentials or reach the node itself.
func nameCannotLift(reason string) bool {
	return reason == ReasonMetadata || reason == ReasonLinkLocal
}
