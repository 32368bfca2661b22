package cluster

import (
	"context"
	"slices"
	"testing"
	"time"
)

// shrinking is a Membership whose members a test sets (an EndpointSlice dropping a
// replica that turned not ready).
type shrinking struct{ members []string }

func (s *shrinking) Members() []string             { return s.members }
func (s *shrinking) Changed() <-chan struct{}      { return make(chan struct{}) }
func (s *shrinking) Run(ctx context.Context) error { return nil }

// keyRankedFirst returns a key whose rank over members starts with first, then second.
func keyRankedFirst(t *testing.T, members []string, first, second string) string {
	t.Helper()
	for _, k := range testKeys(500) {
		if r := Rank(members, k); r[0] == first && r[1] == second {
			return k
		}
	}
	t.Fatal("no key ranked as wanted")
	return ""
}

// A leaving member owns no new fill but is offered the key it ranks first for (Handoff),
// even after the membership dropped it, until the time it announced; MarkServing and the
// end of that time undo it.
func TestRingLeavingMemberHandsOff(t *testing.T) {
	members := testMembers(3)
	leaver, next, self := members[0], members[1], members[2]
	mem := &shrinking{members: members}
	now := time.Unix(1000, 0)
	r := NewRing(mem, self, withClock(func() time.Time { return now }))
	key := keyRankedFirst(t, members, leaver, next)
	if got := r.Route(key); got.Handoff != "" || got.Owners[0] != leaver {
		t.Fatalf("before the notice: %+v", got)
	}
	r.MarkLeaving(leaver, now.Add(30*time.Second))
	got := r.Route(key)
	if got.Handoff != leaver || slices.Contains(got.Owners, leaver) || got.Owners[0] != next {
		t.Fatalf("leaving: %+v, want handoff %s and owners from %s", got, leaver, next)
	}
	if !slices.Equal(r.Owners(key), got.Owners) {
		t.Fatalf("Owners %v differs from Route's %v", r.Owners(key), got.Owners)
	}
	mem.members = []string{next, self} // its endpoint turned not ready
	if got := r.Route(key); got.Handoff != leaver || got.Owners[0] != next {
		t.Fatalf("dropped by the membership while leaving: %+v", got)
	}
	r.MarkDown(leaver)
	if got := r.Route(key); got.Handoff != "" || got.Owners[0] != next {
		t.Fatalf("leaving and down: %+v, want no handoff", got)
	}
	r.down = map[string]time.Time{}
	now = now.Add(31 * time.Second)
	if got := r.Route(key); got.Handoff != "" || got.Owners[0] != next {
		t.Fatalf("after the announced time, dropped: %+v", got)
	}
	if len(r.Leaving()) != 0 {
		t.Fatalf("Leaving = %v after the announced time", r.Leaving())
	}
	mem.members = members
	r.MarkLeaving(leaver, now.Add(time.Hour))
	r.MarkServing(leaver)
	if got := r.Route(key); got.Handoff != "" || got.Owners[0] != leaver {
		t.Fatalf("after MarkServing: %+v", got)
	}
}

// An announced time beyond MaxLeaving is capped.
func TestRingLeavingCapped(t *testing.T) {
	members := testMembers(2)
	now := time.Unix(1000, 0)
	r := NewRing(&shrinking{members: members}, members[1], withClock(func() time.Time { return now }))
	r.MarkLeaving(members[0], now.Add(24*time.Hour))
	now = now.Add(MaxLeaving + time.Second)
	if l := r.Leaving(); len(l) != 0 {
		t.Fatalf("Leaving = %v past MaxLeaving", l)
	}
}

// A replica that drains itself forwards every key to the live members first and keeps
// itself as the last resort; it is never its own handoff.
func TestRingSelfLeavingComesLast(t *testing.T) {
	members := testMembers(3)
	self := members[0]
	r := NewRing(&shrinking{members: members}, self)
	key := keyRankedFirst(t, members, self, members[1])
	r.MarkLeaving(self, time.Time{})
	got := r.Route(key)
	if got.Handoff != "" || got.Owners[0] != members[1] || got.Owners[len(got.Owners)-1] != self || len(got.Owners) != 3 {
		t.Fatalf("self leaving: %+v", got)
	}
	r.MarkDown(members[1])
	r.MarkDown(members[2])
	if got := r.Owners(key); !slices.Equal(got, []string{self}) {
		t.Fatalf("self leaving, every other member down: %v, want only self", got)
	}
}
