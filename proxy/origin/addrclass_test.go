package origin

import (
	"encoding/binary"
	"net/netip"
	"testing"
)

// classifyTable is every address class, and every IPv6 form that embeds an IPv4 address;
// it also seeds FuzzClassify.
var classifyTable = []struct{ addr, want string }{
	{"169.254.169.254", ReasonMetadata},
	{"fd00:ec2::254", ReasonMetadata},
	{"100.100.100.200", ReasonMetadata},
	{"127.0.0.1", ReasonLoopback},
	{"127.9.9.9", ReasonLoopback},
	{"::1", ReasonLoopback},
	{"10.1.2.3", ReasonPrivate},
	{"172.16.0.1", ReasonPrivate},
	{"192.168.1.1", ReasonPrivate},
	{"100.64.0.1", ReasonPrivate},
	{"fd12::1", ReasonPrivate},
	{"fec0::1", ReasonPrivate},
	{"169.254.1.1", ReasonLinkLocal},
	{"fe80::1", ReasonLinkLocal},
	{"fe80::1%eth0", ReasonLinkLocal},
	{"0.0.0.0", ReasonUnspecified},
	{"0.1.2.3", ReasonUnspecified},
	{"::", ReasonUnspecified},
	{"224.0.0.1", ReasonMulticast},
	{"ff02::1", ReasonMulticast},
	{"255.255.255.255", ReasonMulticast},
	{"240.0.0.1", ReasonReserved},
	{"198.18.0.1", ReasonReserved},
	{"192.0.0.8", ReasonReserved},
	{"192.0.2.1", ReasonReserved},   // documentation (from the IANA tables of code.dny.dev/ssrf)
	{"203.0.113.9", ReasonReserved}, // documentation
	{"100::1", ReasonReserved},      // discard
	{"2001:db8::1", ReasonReserved}, // documentation
	{"4000::1", ReasonReserved},     // outside global unicast 2000::/3
	{"2001:2::1", ReasonReserved},   // benchmarking, in 2001::/23
	{"8.8.8.8", ""},
	{"93.184.215.14", ""},
	{"2606:4700::1111", ""},

	// IPv4-mapped: the IPv4 address, whatever it is.
	{"::ffff:127.0.0.1", ReasonLoopback},
	{"::ffff:169.254.169.254", ReasonMetadata},
	{"::ffff:93.184.215.14", ""},
	// IPv4-compatible (::a.b.c.d): the IPv4 address; a public one is still a deprecated form.
	{"::a9fe:a9fe", ReasonMetadata},
	{"::7f00:1", ReasonLoopback},
	{"::a00:1", ReasonPrivate},
	{"::a9fe:101", ReasonLinkLocal},
	{"::808:808", ReasonReserved},
	// IPv4-translated (SIIT, ::ffff:0:a.b.c.d).
	{"::ffff:0:a9fe:a9fe", ReasonMetadata},
	{"::ffff:0:a00:1", ReasonPrivate},
	// Well-known NAT64 (64:ff9b::/96): the IPv4 address alone; a public one is allowed.
	{"64:ff9b::a9fe:a9fe", ReasonMetadata},
	{"64:ff9b::169.254.169.254", ReasonMetadata},
	{"64:ff9b::a9fe:101", ReasonLinkLocal},
	{"64:ff9b::7f00:1", ReasonLoopback},
	{"64:ff9b::a00:1", ReasonPrivate},
	{"64:ff9b::e000:1", ReasonMulticast},
	{"64:ff9b::808:808", ""},
	// Local-use NAT64 (64:ff9b:1::/48): private at least, worse by any RFC 6052 position.
	{"64:ff9b:1::808:808", ReasonPrivate},
	{"64:ff9b:1::a9fe:a9fe", ReasonMetadata},       // /96 position
	{"64:ff9b:1:a9fe:a9:fe00::", ReasonMetadata},   // /48 position, skipping bits 64-71
	{"64:ff9b:1:0:a9:fe01:100:0", ReasonLinkLocal}, // /64 position
	{"64:ff9b:1::7f00:1", ReasonPrivate},           // loopback is private here: either way only an allow rule lifts it
	{"64:ff9b:1:ffff:ffff:ffff:ffff:ffff", ReasonPrivate},
	// 6to4 (2002::/16, IPv4 in bits 16-47): the IPv4 address; a public one is reserved.
	{"2002:a9fe:a9fe::1", ReasonMetadata},
	{"2002:7f00:1::", ReasonLoopback},
	{"2002:a00:1:5::1", ReasonPrivate},
	{"2002:808:808::1", ReasonReserved},
	// Teredo (2001::/32): the server (bits 32-63) and the client (bits 96-127, inverted).
	{"2001:0:4136:e378::5601:5601", ReasonMetadata}, // client 169.254.169.254
	{"2001:0:a9fe:a9fe::1", ReasonMetadata},         // server 169.254.169.254
	{"2001:0:4136:e378:8000:63bf:3fff:fdd2", ReasonReserved},
}

func TestClassify(t *testing.T) {
	for _, tt := range classifyTable {
		if got := Classify(netip.MustParseAddr(tt.addr)); got != tt.want {
			t.Errorf("Classify(%s) = %q, want %q", tt.addr, got, tt.want)
		}
	}
	if got := Classify(netip.Addr{}); got != ReasonUnspecified {
		t.Errorf("Classify(invalid) = %q", got)
	}
}

// embeddings are the IPv6 forms of one IPv4 address.
func embeddings(v4 [4]byte) map[string]netip.Addr {
	put := func(prefix string, at int) netip.Addr {
		b := netip.MustParseAddr(prefix).As16()
		copy(b[at:at+4], v4[:])
		return netip.AddrFrom16(b)
	}
	return map[string]netip.Addr{
		"mapped":     put("::ffff:0:0", 12),
		"compatible": put("::", 12),
		"translated": put("::ffff:0:0:0", 12),
		"nat64":      put("64:ff9b::", 12),
		"local-use":  put("64:ff9b:1::", 12),
		"6to4":       put("2002::1", 2),
	}
}

// FuzzClassify: no IPv6 form of an IPv4 address is judged better than the address itself.
func FuzzClassify(f *testing.F) {
	for _, tt := range classifyTable {
		a := netip.MustParseAddr(tt.addr)
		b := a.As16()
		f.Add(binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:]))
	}
	f.Fuzz(func(t *testing.T, hi, lo uint64) {
		var b [16]byte
		binary.BigEndian.PutUint64(b[:8], hi)
		binary.BigEndian.PutUint64(b[8:], lo)
		a := netip.AddrFrom16(b)
		if _, ok := severity[Classify(a)]; !ok && Classify(a) != "" {
			t.Fatalf("Classify(%s) = %q: not a reason label", a, Classify(a))
		}
		v4 := [4]byte(b[12:])
		want := Classify(netip.AddrFrom4(v4))
		for form, e := range embeddings(v4) {
			got := Classify(e)
			switch {
			case form == "compatible" && (v4 == [4]byte{} || v4 == [4]byte{0, 0, 0, 1}):
				// :: and ::1 are themselves
			case form == "mapped" || form == "nat64":
				if got != want {
					t.Fatalf("%s %s: %q, want %q as %s", form, e, got, want, netip.AddrFrom4(v4))
				}
			case got == "":
				t.Fatalf("%s %s allowed", form, e)
			case form == "local-use":
				// Private at least; never liftable by name if the address is not.
				if nameCannotLift(want) && !nameCannotLift(got) {
					t.Fatalf("%s %s: %q, want %q as %s", form, e, got, want, netip.AddrFrom4(v4))
				}
			case want != "" && got != want:
				t.Fatalf("%s %s: %q, want %q as %s", form, e, got, want, netip.AddrFrom4(v4))
			}
		}
	})
}
