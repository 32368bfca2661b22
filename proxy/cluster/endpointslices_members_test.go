package cluster

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/utils/ptr"
)

// endpoint is one endpoint with the given conditions (nil: unset).
func endpoint(addr string, ready, terminating *bool) discoveryv1.Endpoint {
	return discoveryv1.Endpoint{
		Addresses:  []string{addr},
		Conditions: discoveryv1.EndpointConditions{Ready: ready, Terminating: terminating},
	}
}

func slice(addrType discoveryv1.AddressType, ports []discoveryv1.EndpointPort, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{AddressType: addrType, Ports: ports, Endpoints: eps}
}

func port(name string, number int32) discoveryv1.EndpointPort {
	return discoveryv1.EndpointPort{Name: ptr.To(name), Port: ptr.To(number), Protocol: ptr.To(corev1.ProtocolTCP)}
}

func TestMembersOfReadinessRules(t *testing.T) {
	yes, no := ptr.To(true), ptr.To(false)
	eps := []*discoveryv1.EndpointSlice{
		slice(discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{port("peer", 5006), port("http", 5005)},
			endpoint("10.0.0.1", yes, nil), // ready
			endpoint("10.0.0.2", nil, nil), // unknown counts as ready
			endpoint("10.0.0.3", no, nil),  // not ready
			endpoint("10.0.0.4", yes, yes), // terminating, though reported ready
			endpoint("10.0.0.5", yes, no),  // ready, not terminating
		),
		// The same endpoint in a second slice (slices overlap while they are rebalanced).
		slice(discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{port("peer", 5006)},
			endpoint("10.0.0.1", yes, nil)),
		slice(discoveryv1.AddressTypeIPv6, []discoveryv1.EndpointPort{port("peer", 5006)},
			endpoint("2001:db8:0:0::7", yes, nil)),
		// Without the named port, with a port of no number ("all ports"), with UDP.
		slice(discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{port("http", 5005)}, endpoint("10.0.1.1", yes, nil)),
		slice(discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{{Name: ptr.To("peer")}}, endpoint("10.0.1.2", yes, nil)),
		slice(discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{{Name: ptr.To("peer"), Port: ptr.To[int32](5006), Protocol: ptr.To(corev1.ProtocolUDP)}},
			endpoint("10.0.1.3", yes, nil)),
		// An address that is not an IP in an IP slice.
		slice(discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{port("peer", 5006)}, endpoint("not-an-ip", yes, nil)),
	}
	got := membersOf(eps, "https", "peer")
	want := []string{"https://10.0.0.1:5006", "https://10.0.0.2:5006", "https://10.0.0.5:5006", "https://[2001:db8::7]:5006"}
	if !slices.Equal(got, want) {
		t.Fatalf("membersOf = %q\nwant        %q", got, want)
	}
}

func TestMembersOfUnnamedPort(t *testing.T) {
	eps := []*discoveryv1.EndpointSlice{
		slice(discoveryv1.AddressTypeIPv4, []discoveryv1.EndpointPort{{Port: ptr.To[int32](5005)}}, endpoint("10.0.0.1", nil, nil)),
		slice(discoveryv1.AddressTypeFQDN, []discoveryv1.EndpointPort{port("", 5005)}, endpoint("Cove-0.cove.ns.svc", nil, nil)),
	}
	got := membersOf(eps, "http", "")
	want := []string{"http://10.0.0.1:5005", "http://cove-0.cove.ns.svc:5005"}
	if !slices.Equal(got, want) {
		t.Fatalf("membersOf = %q, want %q", got, want)
	}
	if got := membersOf(eps, "http", "peer"); len(got) != 0 {
		t.Fatalf("a port name no slice has gave members %q", got)
	}
}
