package authz

import (
	"net/http"
	"testing"
	"time"
)

// A decision about a repository as a whole (a referrers list): a fresh allowance serves
// without asking; otherwise the origin is asked and its answer teaches (200: allowance;
// 401: remembered; 404: nothing); a stranger never rides on another's allowance; offline,
// only a recent allowance serves.
func TestMayReadRepository(t *testing.T) {
	a, clk := newTest(t, Config{TTL: 10 * time.Second, Offline: OfflineRecent, OfflineMaxAge: time.Hour})
	var asked int
	if d := a.MayReadRepository(ctx, alice, objA, counted(&asked, http.StatusOK)); d.Verdict != Allow || !d.Asked || asked != 1 {
		t.Fatalf("cold: %+v, asked %d", d, asked)
	}
	if d := a.MayReadRepository(ctx, alice, objA, counted(&asked, http.StatusOK)); d.Verdict != Allow || d.Asked || asked != 1 {
		t.Fatalf("with a fresh allowance: %+v, asked %d", d, asked)
	}
	if d := a.MayReadRepository(ctx, bob, objA, counted(&asked, http.StatusUnauthorized)); d.Verdict != Deny || d.Status != 401 || asked != 2 {
		t.Fatalf("stranger: %+v", d)
	}
	if d := a.MayReadRepository(ctx, bob, objA, counted(&asked, http.StatusOK)); d.Verdict != Deny || d.Asked || asked != 2 {
		t.Fatalf("stranger again, within the TTL: %+v (asked %d)", d, asked)
	}
	if a.IsMember(ctx, objA) {
		t.Fatal("a repository decision made a membership")
	}
	if d := a.MayReadRepository(ctx, Credential("carol"), objA, counted(&asked, http.StatusNotFound)); d.Verdict != Deny || d.Status != 404 || a.AllowedNow(Credential("carol"), objA) {
		t.Fatalf("404: %+v", d)
	}
	clk.add(11 * time.Second)
	if d := a.MayReadRepository(ctx, alice, objA, counted(&asked, http.StatusOK)); !d.Asked || asked != 4 {
		t.Fatalf("after the TTL the origin is asked again: %+v", d)
	}
	clk.add(11 * time.Second)
	if d := a.MayReadRepository(ctx, alice, objA, unreachable()); d.Verdict != AllowStale {
		t.Fatalf("offline, recent allowance: %+v", d)
	}
	if d := a.MayReadRepository(ctx, Credential("carol"), objA, unreachable()); d.Verdict != Unavailable {
		t.Fatalf("offline, no allowance: %+v", d)
	}
}
