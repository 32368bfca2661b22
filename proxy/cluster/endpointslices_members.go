package cluster

import (
	"net"
	"slices"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// membersOf returns the base URLs (scheme://address:port) of the endpoints in eps that
// can take requests now, sorted and without duplicates, on the port named portName.
//
// The rules are the EndpointSlice API's: an endpoint is ready when its ready condition
// is true or unset (unknown counts as ready); a terminating endpoint is left out even
// when it still reports ready (a Service that publishes not-ready addresses does
// that), because a replica shutting down must stop owning digests. Only the first
// address of an endpoint is used (the API says they are fungible). A slice without
// the named port, or where it has no number ("all ports") or is not TCP, gives no
// member. Members are in ParseMember's form.
func membersOf(eps []*discoveryv1.EndpointSlice, scheme, portName string) []string {
	var members []string
	for _, s := range eps {
		port, ok := slicePort(s, portName)
		if !ok {
			continue
		}
		switch s.AddressType {
		case discoveryv1.AddressTypeIPv4, discoveryv1.AddressTypeIPv6, discoveryv1.AddressTypeFQDN:
		default:
			continue
		}
		for _, e := range s.Endpoints {
			if !endpointServes(e) || len(e.Addresses) == 0 {
				continue
			}
			host := e.Addresses[0]
			if s.AddressType != discoveryv1.AddressTypeFQDN {
				ip := net.ParseIP(host)
				if ip == nil {
					continue
				}
				host = ip.String()
			}
			// The form ParseMember gives --peer and --advertise-url, so a replica finds
			// itself in the list and every replica hashes the same strings.
			member, err := ParseMember(scheme + "://" + net.JoinHostPort(host, strconv.Itoa(int(port))))
			if err != nil {
				continue
			}
			members = append(members, member)
		}
	}
	slices.Sort(members)
	return slices.Compact(members)
}

// slicePort is the number of the port named name in s.
func slicePort(s *discoveryv1.EndpointSlice, name string) (int32, bool) {
	for _, p := range s.Ports {
		pname := ""
		if p.Name != nil {
			pname = *p.Name
		}
		if pname != name {
			continue
		}
		if p.Port == nil || *p.Port <= 0 || *p.Port > 65535 {
			return 0, false
		}
		if p.Protocol != nil && *p.Protocol != corev1.ProtocolTCP {
			return 0, false
		}
		return *p.Port, true
	}
	return 0, false
}

// endpointServes applies the readiness rules: ready true or unset, and not terminating.
func endpointServes(e discoveryv1.Endpoint) bool {
	c := e.Conditions
	if c.Ready != nil && !*c.Ready {
		return false
	}
	return c.Terminating == nil || !*c.Terminating
}
