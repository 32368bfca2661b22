package cluster

import (
	"testing"
	"time"
)

func TestRingOwnersEndAtSelf(t *testing.T) {
	members := testMembers(3)
	s, err := NewStatic(members)
	if err != nil {
		t.Fatal(err)
	}
	for _, self := range members {
		r := NewRing(s, self)
		for _, k := range testKeys(200) {
			owners := r.Owners(k)
			rank := Rank(members, k)
			if owners[len(owners)-1] != self {
				t.Fatalf("Owners(%s) from %s = %v: does not end at self", k, self, owners)
			}
			for i, o := range owners {
				if rank[i] != o {
					t.Fatalf("Owners(%s) = %v, rank %v", k, owners, rank)
				}
			}
		}
	}
}

// A member marked down is skipped for DownFor, then asked again; self is never down.
func TestRingMarkDown(t *testing.T) {
	members := testMembers(3)
	s, _ := NewStatic(members)
	now := time.Unix(1000, 0)
	self := members[2]
	r := NewRing(s, self, WithDownFor(5*time.Second), withClock(func() time.Time { return now }))
	var key, owner string
	for _, k := range testKeys(100) {
		if o := Owner(members, k); o != self {
			key, owner = k, o
			break
		}
	}
	if !r.MarkDown(owner) {
		t.Fatal("the first MarkDown did not report a new outage")
	}
	if r.MarkDown(owner) {
		t.Fatal("a second MarkDown within DownFor reported a new outage")
	}
	for _, o := range r.Owners(key) {
		if o == owner {
			t.Fatalf("Owners(%s) = %v still lists the member marked down", key, r.Owners(key))
		}
	}
	if r.MarkDown(self) {
		t.Fatal("self was marked down")
	}
	if got := r.Owners(key); got[len(got)-1] != self {
		t.Fatalf("Owners = %v without self", got)
	}
	now = now.Add(6 * time.Second)
	if got := r.Owners(key); got[0] != owner {
		t.Fatalf("after DownFor, Owners = %v, want %s first again", got, owner)
	}
}

// A replica its membership does not list (yet) still owns its share: it fetches itself.
func TestRingSelfNotListed(t *testing.T) {
	s, _ := NewStatic(testMembers(2))
	self := "http://10.0.0.50:5005"
	r := NewRing(s, self)
	selfOwns := 0
	for _, k := range testKeys(300) {
		owners := r.Owners(k)
		if owners[len(owners)-1] != self {
			t.Fatalf("Owners = %v without self", owners)
		}
		if owners[0] == self {
			selfOwns++
		}
	}
	if selfOwns == 0 {
		t.Fatal("an unlisted self never owns a key")
	}
}
