package cluster

import (
	"strings"
	"testing"
)

func TestMemberID(t *testing.T) {
	a, b := "http://10.0.0.1:5005", "http://10.0.0.2:5005"
	if MemberID(a) != MemberID(a) || MemberID(a) == MemberID(b) {
		t.Fatalf("ids %q %q", MemberID(a), MemberID(b))
	}
	if len(MemberID(a)) != MemberIDLen || strings.ContainsAny(MemberID(a), "=+/.") {
		t.Fatalf("id %q is not %d URL-safe characters", MemberID(a), MemberIDLen)
	}
	st, err := NewStatic([]string{a, b})
	if err != nil {
		t.Fatal(err)
	}
	r := NewRing(st, b)
	if m, ok := r.MemberByID(MemberID(a)); !ok || m != a {
		t.Fatalf("MemberByID(a) = %q, %v", m, ok)
	}
	if m, ok := r.MemberByID(MemberID(b)); !ok || m != b {
		t.Fatalf("MemberByID(self) = %q, %v", m, ok)
	}
	// A member that has left, a made-up id, a wrong length: none.
	for _, id := range []string{MemberID("http://10.0.0.3:5005"), "AAAAAAAAAAA", "", MemberID(a) + "x"} {
		if m, ok := r.MemberByID(id); ok {
			t.Fatalf("MemberByID(%q) = %q", id, m)
		}
	}
}
