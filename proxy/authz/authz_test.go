package authz

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
)

// mapRecords is an in-memory Records.
type mapRecords struct {
	mu sync.Mutex
	m  map[string][]byte
}

func (r *mapRecords) PutRecord(_ context.Context, k string, v []byte) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.m[k] = v
	return nil
}

func (r *mapRecords) GetRecord(_ context.Context, k string) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	v, ok := r.m[k]
	if !ok {
		return nil, errdefs.ErrNotFound
	}
	return v, nil
}

func (r *mapRecords) DeleteRecord(_ context.Context, k string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.m[k]; !ok {
		return errdefs.ErrNotFound
	}
	delete(r.m, k)
	return nil
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time      { return c.t }
func (c *clock) add(d time.Duration) { c.t = c.t.Add(d) }
func newClock() *clock               { return &clock{t: time.Unix(1_700_000_000, 0)} }
func answer(status int) AskOrigin    { return counted(nil, status) }
func unreachable() AskOrigin {
	return func(context.Context) OriginAnswer { return OriginAnswer{Err: errors.New("down")} }
}
func counted(n *int, status int) AskOrigin {
	return func(context.Context) OriginAnswer {
		if n != nil {
			*n++
		}
		h := http.Header{}
		if status == http.StatusUnauthorized {
			h.Set("Www-Authenticate", `Bearer realm="https://auth.example/token"`)
		}
		return OriginAnswer{Status: status, Header: h}
	}
}

func newTest(t *testing.T, cfg Config) (*Authorizer, *clock) {
	t.Helper()
	c := newClock()
	cfg.Records = &mapRecords{m: map[string][]byte{}}
	cfg.Now = c.now
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return a, c
}

var (
	ctx    = context.Background()
	layer  = digest.FromString("tenant A's private layer")
	objA   = Object{Registry: "registry.example", Repository: "team-a/app", Digest: layer}
	objB   = Object{Registry: "registry.example", Repository: "team-b/app", Digest: layer}
	alice  = Credential("alice")
	bob    = Credential("bob")
	nobody = Credential("")
)

func TestFreshAllowanceAndMembershipSkipTheOrigin(t *testing.T) {
	a, clk := newTest(t, Config{TTL: 10 * time.Second})
	asked := 0
	if d := a.MayRead(ctx, alice, objA, counted(&asked, 200)); d.Verdict != Allow || !d.Asked {
		t.Fatalf("first read: %+v", d)
	}
	if d := a.MayRead(ctx, alice, objA, counted(&asked, 200)); d.Verdict != Allow || d.Asked {
		t.Fatalf("second read within the TTL: %+v", d)
	}
	clk.add(10 * time.Second)
	if d := a.MayRead(ctx, alice, objA, counted(&asked, 200)); d.Verdict != Allow || !d.Asked {
		t.Fatalf("read after the TTL must ask again: %+v", d)
	}
	if asked != 2 {
		t.Fatalf("origin asked %d times, want 2", asked)
	}
}

// An allowance for one's own repository never unlocks a digest the origin has not said
// the repository holds: the attack of a manifest listing another tenant's digest.
func TestAllowanceWithoutMembershipAsksTheOrigin(t *testing.T) {
	a, _ := newTest(t, Config{})
	a.Learn(ctx, alice, objA)
	a.Allowed(bob, Object{Registry: objB.Registry, Repository: objB.Repository}) // bob read his own tag
	d := a.MayRead(ctx, bob, objB, answer(404))
	if d.Verdict != Deny || d.Status != 404 || !d.Asked {
		t.Fatalf("bob's read of alice's digest in his own repository: %+v, want the origin's 404", d)
	}
	if a.IsMember(ctx, objB) {
		t.Fatal("a 404 made a membership")
	}
}

// Nobody erases a membership for others: only a 404 to a credential the origin
// otherwise allows in the repository ends it.
func TestOnlyAnAllowedReadersNotFoundDropsMembership(t *testing.T) {
	a, clk := newTest(t, Config{TTL: 10 * time.Second})
	a.Learn(ctx, alice, objA)
	if d := a.MayRead(ctx, bob, objA, answer(404)); d.Verdict != Deny {
		t.Fatalf("stranger: %+v", d)
	}
	if d := a.MayRead(ctx, nobody, objA, answer(401)); d.Verdict != Deny || d.Status != 401 {
		t.Fatalf("anonymous: %+v", d)
	}
	if !a.IsMember(ctx, objA) {
		t.Fatal("a stranger's 404 erased alice's membership")
	}
	clk.add(time.Second)
	if d := a.MayRead(ctx, alice, objA, answer(500)); d.Verdict != Allow {
		t.Fatalf("alice within her allowance: %+v", d) // fresh: the origin is not even asked
	}
	clk.add(10 * time.Second)
	a.Allowed(alice, objA) // alice just read something else in team-a
	a.NotFound(ctx, alice, objA)
	if a.IsMember(ctx, objA) {
		t.Fatal("a 404 to an allowed reader must end the membership (the digest was deleted)")
	}
}

func TestRefusalIsRememberedBriefly(t *testing.T) {
	a, clk := newTest(t, Config{TTL: 10 * time.Second})
	asked := 0
	for i := 0; i < 3; i++ {
		if d := a.MayRead(ctx, bob, objA, counted(&asked, 401)); d.Verdict != Deny || d.Status != 401 || d.Header.Get("Www-Authenticate") == "" {
			t.Fatalf("refusal %d: %+v", i, d)
		}
	}
	if asked != 1 {
		t.Fatalf("origin asked %d times for a remembered refusal", asked)
	}
	clk.add(10 * time.Second)
	a.MayRead(ctx, bob, objA, counted(&asked, 401))
	if asked != 2 {
		t.Fatal("a refusal outlived the TTL")
	}
	// A yes replaces the refusal at once.
	a.Learn(ctx, bob, objA)
	if _, ok := a.Challenge(bob, objA); ok {
		t.Fatal("refusal kept after the origin said yes")
	}
}

func TestOfflinePolicy(t *testing.T) {
	for _, tc := range []struct {
		policy string
		age    time.Duration
		member bool
		want   Verdict
	}{
		{OfflineDeny, time.Minute, true, Unavailable},
		{OfflineRecent, time.Minute, true, AllowStale},
		{OfflineRecent, 2 * time.Hour, true, Unavailable},
		{OfflineRecent, time.Minute, false, Unavailable},
	} {
		a, clk := newTest(t, Config{TTL: 10 * time.Second, Offline: tc.policy, OfflineMaxAge: time.Hour})
		if tc.member {
			a.Learn(ctx, alice, objA)
		} else {
			a.Allowed(alice, objA)
		}
		clk.add(tc.age)
		if d := a.MayRead(ctx, alice, objA, unreachable()); d.Verdict != tc.want {
			t.Errorf("%s, allowance %v old, member %v: verdict %v, want %v", tc.policy, tc.age, tc.member, d.Verdict, tc.want)
		}
		// A stranger never gets anything offline.
		if d := a.MayRead(ctx, bob, objA, unreachable()); d.Verdict != Unavailable {
			t.Errorf("%s: stranger offline: %v", tc.policy, d.Verdict)
		}
	}
	// A 5xx is the origin failing, not refusing: relayed when the policy does not serve.
	a, _ := newTest(t, Config{})
	if d := a.MayRead(ctx, alice, objA, answer(503)); d.Verdict != Deny || d.Status != 503 {
		t.Fatalf("503: %+v", d)
	}
}

func TestMembershipIsPerRegistryAndRepository(t *testing.T) {
	a, _ := newTest(t, Config{})
	a.Learn(ctx, alice, objA)
	for _, o := range []Object{
		objB,
		{Registry: "evil.example", Repository: objA.Repository, Digest: layer},
		{Registry: objA.Registry, Repository: objA.Repository, Digest: digest.FromString("other")},
	} {
		if a.IsMember(ctx, o) {
			t.Errorf("%+v is a member", o)
		}
	}
	if a.IsMember(ctx, Object{Registry: objA.Registry, Repository: objA.Repository, Digest: "sha256:bad"}) {
		t.Error("an invalid digest is a member")
	}
}

func TestNewRefusesUnknownOfflinePolicy(t *testing.T) {
	if _, err := New(Config{Records: &mapRecords{}, Offline: "sometimes"}); err == nil {
		t.Fatal("accepted an unknown offline policy")
	}
	if _, err := New(Config{}); err == nil {
		t.Fatal("accepted no record store")
	}
}

// The origin's 202 to a DELETE ends the membership in that repository only: the same
// digest in another repository stays servable there, and the deleting credential's
// allowance is not touched (a delete is no proof of read access, nor of its absence).
func TestForgetEndsOneMembership(t *testing.T) {
	a, _ := newTest(t, Config{TTL: 10 * time.Second})
	a.Learn(ctx, alice, objA)
	a.Learn(ctx, bob, objB)
	a.Forget(ctx, objA)
	if a.IsMember(ctx, objA) {
		t.Fatal("a forgotten object is still a member")
	}
	if !a.IsMember(ctx, objB) {
		t.Fatal("forgetting team-a's copy ended team-b's")
	}
	asked := 0
	if d := a.MayRead(ctx, alice, objA, counted(&asked, 404)); d.Verdict != Deny || asked != 1 {
		t.Fatalf("alice's read of the forgotten object: %+v, origin asked %d times; want its 404", d, asked)
	}
	if d := a.MayRead(ctx, bob, objB, counted(&asked, 500)); d.Verdict != Allow || asked != 1 {
		t.Fatalf("bob's read of his own copy: %+v", d)
	}
}
