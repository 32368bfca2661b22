package cluster

import (
	"fmt"
	"slices"
	"testing"

	"github.com/opencontainers/go-digest"
)

func testKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = digest.FromString(fmt.Sprintf("blob %d", i)).String()
	}
	return keys
}

func testMembers(n int) []string {
	m := make([]string, n)
	for i := range m {
		m[i] = fmt.Sprintf("http://10.0.0.%d:5005", i+1)
	}
	return m
}

// Every replica computes the same owner whatever order it lists the members in, and
// the owner is the first of Rank.
func TestRendezvousStable(t *testing.T) {
	members := testMembers(5)
	reversed := slices.Clone(members)
	slices.Reverse(reversed)
	for _, k := range testKeys(1000) {
		o := Owner(members, k)
		if o2 := Owner(reversed, k); o2 != o {
			t.Fatalf("owner of %s: %s in one order, %s in another", k, o, o2)
		}
		r := Rank(reversed, k)
		if r[0] != o || len(r) != len(members) {
			t.Fatalf("Rank(%s) = %v, owner %s", k, r, o)
		}
		if !slices.Equal(r, Rank(members, k)) {
			t.Fatalf("Rank of %s depends on the members' order", k)
		}
	}
	if Owner(nil, "x") != "" || len(Rank(nil, "x")) != 0 {
		t.Fatal("an empty membership has an owner")
	}
}

// Keys spread evenly: with 3 and 5 members, each owns its share within 10 % of it.
func TestRendezvousBalanced(t *testing.T) {
	keys := testKeys(30000)
	for _, n := range []int{3, 5} {
		members := testMembers(n)
		count := map[string]int{}
		for _, k := range keys {
			count[Owner(members, k)]++
		}
		share := len(keys) / n
		for _, m := range members {
			if c := count[m]; c < share*9/10 || c > share*11/10 {
				t.Errorf("%d members: %s owns %d keys, want %d ± 10%%", n, m, c, share)
			}
		}
	}
}

// A member that joins takes keys only for itself, about 1/N of them; one that leaves
// gives away only its own keys, and each to the member next in its rank.
func TestRendezvousMinimalMovement(t *testing.T) {
	keys := testKeys(20000)
	before := testMembers(4)
	after := append(slices.Clone(before), "http://10.0.0.99:5005")
	moved := 0
	for _, k := range keys {
		o1, o2 := Owner(before, k), Owner(after, k)
		if o1 != o2 {
			moved++
			if o2 != "http://10.0.0.99:5005" {
				t.Fatalf("a join moved %s from %s to %s, not to the new member", k, o1, o2)
			}
		}
	}
	if want := len(keys) / 5; moved < want*9/10 || moved > want*11/10 {
		t.Errorf("a join moved %d of %d keys, want about %d", moved, len(keys), want)
	}
	gone := before[1]
	left := slices.Delete(slices.Clone(before), 1, 2)
	for _, k := range keys {
		o1, o2 := Owner(before, k), Owner(left, k)
		if o1 != gone && o1 != o2 {
			t.Fatalf("a leave moved %s from %s (still there) to %s", k, o1, o2)
		}
		if o1 == gone && o2 != Rank(before, k)[1] {
			t.Fatalf("a leave gave %s to %s, not to the next in rank %s", k, o2, Rank(before, k)[1])
		}
	}
}

// Members whose names differ by one character do not share owners.
func TestRendezvousNearNames(t *testing.T) {
	members := []string{"http://a:1", "http://a:2"}
	count := map[string]int{}
	for _, k := range testKeys(10000) {
		count[Owner(members, k)]++
	}
	if count["http://a:1"] < 4500 || count["http://a:2"] < 4500 {
		t.Errorf("owners of near names: %v", count)
	}
}

// The cost of one ownership decision, paid on every blob miss (docs/scaleout.md).
func BenchmarkOwner(b *testing.B) {
	for _, n := range []int{3, 10} {
		members := testMembers(n)
		key := testKeys(1)[0]
		b.Run(fmt.Sprintf("members=%d", n), func(b *testing.B) {
			for b.Loop() {
				_ = Owner(members, key)
			}
		})
	}
}
