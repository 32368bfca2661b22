package evict

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/proxy/fill"
)

// directLink takes a follower's reservations straight to the leader's Store in the
// follower's name (the peer path is tested in proxy/server: peer_reserve_test.go).
type directLink struct {
	self     string
	to       map[string]*Store // member -> its Store
	dropping atomic.Bool       // releases are lost
	before   func()            // runs before each Reserve reaches the leader
	reserves atomic.Int64
	releases atomic.Int64
}

func (l *directLink) Reserve(_ context.Context, leader string, seq uint64, d digest.Digest, cost int64) error {
	l.reserves.Add(1)
	if l.before != nil {
		l.before()
	}
	s := l.to[leader]
	if s == nil {
		return fmt.Errorf("%w: no such member", errdefs.ErrUnavailable)
	}
	return s.GrantReservation(l.self, seq, d, cost)
}

func (l *directLink) Release(ctx context.Context, leader string, seq uint64, d digest.Digest, stored bool, size int64) error {
	if l.dropping.Load() {
		return fmt.Errorf("%w: dropped", errdefs.ErrUnavailable)
	}
	defer l.releases.Add(1)
	return l.to[leader].ReturnReservation(ctx, l.self, seq, d, stored, size)
}

// link gives every follower a direct link to the others.
func (f *sharedFixture) link(rs ...*replica) []*directLink {
	to := map[string]*Store{}
	for _, r := range f.replicas {
		to[r.url] = r.s
	}
	var links []*directLink
	for _, r := range rs {
		l := &directLink{self: r.url, to: to}
		r.s.SetLeaderLink(l)
		links = append(links, l)
	}
	return links
}

func fillKey(s string) fill.Key {
	return fill.Key{Registry: "reg.example", Digest: digest.FromString(s)}
}

// Fills starting at once on two followers get exactly the room the bound leaves: the
// leader decides every grant under one lock. (On the records' estimate alone, each
// follower would count the same free room: see the second half.)
func TestSharedGrantsAtOnceStayWithinTheBound(t *testing.T) {
	const max, size = 4 << 20, 512 * kib
	f := newSharedFixture(t, max, 3)
	leader, rest := f.roles()
	f.link(rest...)
	cost := blobCost(size) + recordCost
	room := max - leader.s.Used()
	want := int(room / cost)

	var granted, refused atomic.Int64
	var releases []func(bool)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rel, err := rest[i%2].s.Reserve(context.Background(), fillKey(fmt.Sprint("at-once-", i)), size)
			switch {
			case err == nil:
				granted.Add(1)
				mu.Lock()
				releases = append(releases, rel)
				mu.Unlock()
			case errdefs.IsResourceExhausted(err):
				refused.Add(1)
			default:
				t.Errorf("reserve %d: %v", i, err)
			}
		}()
	}
	wg.Wait()
	if int(granted.Load()) != want || granted.Load()+refused.Load() != 16 {
		t.Fatalf("granted %d, refused %d of 16 reservations of %d bytes; the bound leaves room for %d", granted.Load(), refused.Load(), cost, want)
	}
	if used := leader.s.Used(); used > max {
		t.Fatalf("the leader counts %d bytes, past the bound of %d", used, max)
	}
	if got := testutil.ToFloat64(leader.m.SharedReservations.WithLabelValues(grantGranted)); int(got) != want {
		t.Fatalf("leader's granted count = %v, want %d", got, want)
	}
	for _, r := range rest {
		if got := testutil.ToFloat64(r.m.SharedReservations.WithLabelValues(grantFallback)); got != 0 {
			t.Fatalf("%s fell back %v times with the leader up", r.url, got)
		}
	}
	// Records taken while the grants are held neither count them twice nor end them.
	f.round()
	f.round()
	if used := leader.s.Used(); used > max || used < int64(want)*cost {
		t.Fatalf("after two rounds the leader counts %d bytes for %d grants of %d", used, want, cost)
	}
	if got := testutil.ToFloat64(leader.m.SharedReservations.WithLabelValues(grantExpired)); got != 0 {
		t.Fatalf("%v grants expired while held", got)
	}
	for _, rel := range releases {
		rel(false)
	}
	waitFor(t, func() bool { return leader.s.Used() < cost })
	f.round() // the records no longer list the reservations released

	// The same at once without the leader's grants: each follower counts the room alone.
	for _, r := range rest {
		r.s.SetLeaderLink(nil)
	}
	var over int64
	for i := range 16 {
		if _, err := rest[i%2].s.Reserve(context.Background(), fillKey(fmt.Sprint("estimate-", i)), size); err == nil {
			over += cost
		}
	}
	if over <= room {
		t.Fatalf("without grants the followers reserved %d of %d: the control does not show the overshoot", over, room)
	}
}

// A grant asked for while the follower writes its record is listed in that record, so
// the leader's round does not take it for one the follower let go.
func TestSharedGrantAskedDuringARecordIsKept(t *testing.T) {
	f := newSharedFixture(t, 4<<20, 2)
	leader, rest := f.roles()
	a := rest[0]
	l := f.link(a)[0]
	l.before = func() {
		if err := a.s.Sync(context.Background()); err != nil {
			t.Error(err)
		}
		if err := leader.s.Sync(context.Background()); err != nil {
			t.Error(err)
		}
	}
	release, err := a.s.Reserve(context.Background(), fillKey("during"), 512*kib)
	if err != nil {
		t.Fatal(err)
	}
	l.before = nil
	f.round(a)
	f.round(leader)
	if got := testutil.ToFloat64(leader.m.SharedReservations.WithLabelValues(grantExpired)); got != 0 {
		t.Fatal("a grant held by the follower expired")
	}
	if used := leader.s.Used(); used < 512*kib {
		t.Fatalf("the leader counts %d bytes with a 512 KiB grant out", used)
	}
	release(false)
	waitFor(t, func() bool { return l.releases.Load() == 1 })
	if used := leader.s.Used(); used >= 512*kib {
		t.Fatalf("the leader counts %d bytes after the release", used)
	}
}

// A grant whose release is lost is a lease: the follower's next record no longer lists
// it, and the leader's round drops it.
func TestSharedGrantLostReleaseExpires(t *testing.T) {
	f := newSharedFixture(t, 4<<20, 2)
	leader, rest := f.roles()
	a := rest[0]
	l := f.link(a)[0]
	release, err := a.s.Reserve(context.Background(), fillKey("lost"), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	l.dropping.Store(true)
	release(false)
	if used := leader.s.Used(); used < 1<<20 {
		t.Fatalf("the leader counts %d bytes before its round", used)
	}
	f.round(a)
	f.round(leader)
	if got := testutil.ToFloat64(leader.m.SharedReservations.WithLabelValues(grantExpired)); got != 1 {
		t.Fatalf("expired = %v, want 1", got)
	}
	if used := leader.s.Used(); used >= 1<<20 {
		t.Fatalf("the leader counts %d bytes after the grant expired", used)
	}
}

// A blob stored on a grant is counted by the leader when the grant comes back, not one
// round later: the room never looks free in between.
func TestSharedGrantStoredIsCountedAtOnce(t *testing.T) {
	f := newSharedFixture(t, 4<<20, 2)
	leader, rest := f.roles()
	a := rest[0]
	l := f.link(a)[0]
	before := leader.s.Used()
	b := make([]byte, 300*kib)
	for i := range b {
		b[i] = byte(i * 7)
	}
	d := digest.FromBytes(b)
	release, err := a.s.Reserve(context.Background(), fill.Key{Registry: "reg.example", Digest: d}, int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	// The fill's reservation ends at its commit, and the grant goes back stored.
	if err := a.s.Put(context.Background(), d, int64(len(b)), bytes.NewReader(b)); err != nil {
		t.Fatal(err)
	}
	release(true)
	waitFor(t, func() bool { return l.releases.Load() == 1 })
	if used := leader.s.Used(); used < before+blobCost(int64(len(b))) {
		t.Fatalf("the leader counts %d bytes after a stored grant came back (%d before): the blob is not counted", used, before)
	}
}

// The leader's side refuses what it must: not the leader, a replay after release, a
// release in another member's name, bad arguments; a retried release is harmless.
func TestSharedGrantRefusals(t *testing.T) {
	f := newSharedFixture(t, 4<<20, 2)
	leader, rest := f.roles()
	a := rest[0]
	d := digest.FromString("x")
	if err := a.s.GrantReservation(leader.url, 1, d, 100); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("a follower granted: %v", err)
	}
	for _, c := range []struct {
		member string
		seq    uint64
		d      digest.Digest
		cost   int64
	}{{"", 1, d, 100}, {a.url, 0, d, 100}, {a.url, 1, "sha256:nope", 100}, {a.url, 1, d, 0}, {a.url, 1, d, -5}} {
		if err := leader.s.GrantReservation(c.member, c.seq, c.d, c.cost); !errdefs.IsInvalidArgument(err) {
			t.Fatalf("GrantReservation%v: %v, want invalid argument", c, err)
		}
	}
	if err := leader.s.GrantReservation(a.url, 7, d, 5<<20); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("a grant past the bound: %v", err)
	}
	if err := leader.s.GrantReservation(a.url, 8, d, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := leader.s.GrantReservation(a.url, 8, d, 1<<20); err != nil {
		t.Fatalf("the same grant asked again: %v", err)
	}
	if err := leader.s.GrantReservation(a.url, 8, d, 2<<20); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("seq 8 again for another size: %v", err)
	}
	if err := leader.s.ReturnReservation(context.Background(), "http://127.0.0.1:9", 8, d, false, -1); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("another member returned a's grant: %v", err)
	}
	used := leader.s.Used()
	if used < 1<<20 {
		t.Fatal("a's grant ended by another member's release")
	}
	for range 2 {
		if err := leader.s.ReturnReservation(context.Background(), a.url, 8, d, false, -1); err != nil {
			t.Fatalf("release (and its retry): %v", err)
		}
	}
	if err := leader.s.GrantReservation(a.url, 8, d, 1<<20); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("a replay after release: %v", err)
	}
	if leader.s.Used() >= used {
		t.Fatal("the replay took room")
	}
}

// When the leader moves, the new leader counts the old grants from the holders' records
// until they end, and the holders' releases to the old leader change nothing there.
func TestSharedGrantsAcrossALeaderChange(t *testing.T) {
	f := newSharedFixture(t, 4<<20, 3)
	leader, rest := f.roles()
	f.link(rest...)
	a := rest[0]
	release, err := a.s.Reserve(context.Background(), fillKey("moving"), 2<<20)
	if err != nil {
		t.Fatal(err)
	}
	f.round(a)
	// The leader leaves the membership; the next one takes over from the records.
	var others []string
	for _, m := range f.members {
		if m != leader.url {
			others = append(others, m)
		}
	}
	f.members = others
	f.round(rest...)
	f.round(rest...)
	var next *replica
	for _, r := range rest {
		if r.s.IsLeader() {
			next = r
		}
	}
	if next == nil {
		t.Fatal("no new leader")
	}
	if used := next.s.Used(); used < 2<<20 {
		t.Fatalf("the new leader counts %d bytes with a's 2 MiB grant from the old one out", used)
	}
	if err := next.s.GrantReservation(leader.url, 99, digest.FromString("y"), 2<<20+512*kib); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("the new leader granted past a's old grant: %v", err)
	}
	release(false)
	f.round(rest...)
	f.round(rest...)
	if used := next.s.Used(); used >= 2<<20 {
		t.Fatalf("the new leader counts %d bytes after a released", used)
	}
}

// A leader that does not decide (down, hung, not the leader any more) is asked once per
// backoff, not once per fill: the fills in between reserve on the records' estimate at
// once rather than each wait for the call's timeout.
func TestSharedGrantLeaderUndecidedBacksOff(t *testing.T) {
	f := newSharedFixture(t, 4<<20, 2)
	_, rest := f.roles()
	a := rest[0]
	l := &directLink{self: a.url, to: map[string]*Store{}} // reaches no one
	a.s.SetLeaderLink(l)
	for i := range 3 {
		rel, err := a.s.Reserve(context.Background(), fillKey(fmt.Sprint("undecided-", i)), 100*kib)
		if err != nil {
			t.Fatalf("reservation %d with the leader unreachable: %v", i, err)
		}
		rel(false)
	}
	if got := l.reserves.Load(); got != 1 {
		t.Fatalf("the unreachable leader was asked %d times for 3 fills", got)
	}
	if got := testutil.ToFloat64(a.m.SharedReservations.WithLabelValues(grantFallback)); got != 3 {
		t.Fatalf("fallbacks = %v, want 3", got)
	}
	f.clk.Advance(linkBackoff + time.Second)
	rel, err := a.s.Reserve(context.Background(), fillKey("after the backoff"), 100*kib)
	if err != nil {
		t.Fatal(err)
	}
	rel(false)
	if got := l.reserves.Load(); got != 2 {
		t.Fatalf("after the backoff the leader was asked %d times in all, want 2", got)
	}
}

// A store that sits between its watermarks refuses a fill larger than what is left; the
// refusal makes the leader free that room, so the next such fill fits (without it, every
// one would pass through unstored while nothing passes the high watermark).
func TestSharedGrantRefusalMakesRoom(t *testing.T) {
	const max = 4 << 20
	f := newSharedFixture(t, max, 2)
	leader, rest := f.roles()
	for range 7 {
		f.put(leader, 480*kib)
	}
	f.round()
	if used := leader.s.Used(); used > max*9/10 || used+1<<20 <= max {
		t.Fatalf("the leader counts %d bytes: the test wants it between the high watermark and 1 MiB short of the bound", used)
	}
	d := digest.FromString("big")
	if err := leader.s.GrantReservation(rest[0].url, 1, d, 1<<20); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("1 MiB with less left: %v", err)
	}
	for range 3 {
		f.round()
	}
	if got := testutil.ToFloat64(leader.m.Evictions.WithLabelValues(triggerMaxSize)); got == 0 {
		t.Fatal("the refusal freed nothing")
	}
	if err := leader.s.GrantReservation(rest[0].url, 2, d, 1<<20); err != nil {
		t.Fatalf("the next 1 MiB after the leader made room: %v", err)
	}
}
