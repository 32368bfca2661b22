package evict

import (
	"context"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/proxy/fill"
)

// Every member has its own record names, whatever its URL spells.
func TestMemberKeys(t *testing.T) {
	a, b := memberKey(seenPrefix, "http://10.0.0.1:5000"), memberKey(seenPrefix, "http://10.0.0.1:5001")
	if a == b || a != memberKey(seenPrefix, "http://10.0.0.1:5000") {
		t.Fatalf("keys %q and %q", a, b)
	}
	if len(a) != len(seenPrefix)+32 {
		t.Fatalf("key %q: want the prefix and 32 hex digits", a)
	}
}

// A record that does not decode is an error that stops the round: the leader cannot
// know whether that replica reads a blob, so it deletes nothing.
func TestSharedEvictionCorruptRecordStopsDeletion(t *testing.T) {
	f := newSharedFixture(t, 1<<20, 2)
	leader, rest := f.roles()
	for range 6 {
		f.put(rest[0], 150*kib)
	}
	f.round(rest[0])
	f.round(leader) // dooms
	if err := f.replicas[0].d.PutRecord(context.Background(), memberKey(seenPrefix, rest[0].url), []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		f.clk.Advance(1)
		if err := leader.s.Sync(context.Background()); !errdefs.IsDataLoss(err) {
			t.Fatalf("Sync over a corrupt record: %v, want data loss", err)
		}
	}
	if got := testutil.ToFloat64(leader.m.Evictions.WithLabelValues(triggerMaxSize)); got != 0 {
		t.Fatalf("%v blobs deleted while a replica's record was unreadable", got)
	}
	if got := testutil.ToFloat64(leader.m.Errors.WithLabelValues("shared")); got != 3 {
		t.Fatalf("shared errors = %v, want 3", got)
	}
}

// A reservation counts what the other replicas stored since the leader last merged
// their records, read from their records at the time of the reservation.
func TestSharedReservationCountsOtherReplicas(t *testing.T) {
	f := newSharedFixture(t, 1<<20, 3)
	leader, rest := f.roles()
	a, b := rest[0], rest[1]
	for range 5 {
		f.put(a, 150*kib)
	}
	f.round(a) // a's record lists what it stored; the leader has not merged it
	key := fill.Key{Registry: "reg.example", Digest: digest.FromString("next")}
	if _, err := b.s.Reserve(context.Background(), key, 300*kib); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("b reserved 300 KiB over a's unmerged 5 x 150 KiB in 1 MiB: %v", err)
	}
	if _, err := leader.s.Reserve(context.Background(), key, 300*kib); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("the leader reserved 300 KiB over a's unmerged 5 x 150 KiB in 1 MiB: %v", err)
	}
	release, err := b.s.Reserve(context.Background(), key, 100*kib)
	if err != nil {
		t.Fatalf("b could not reserve 100 KiB: %v", err)
	}
	f.round(b)
	// b's reservation counts for a in turn, until b releases it.
	if _, err := a.s.Reserve(context.Background(), key, 150*kib); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("a reserved past b's reservation: %v", err)
	}
	release(false)
	f.round(b)
	if r, err := a.s.Reserve(context.Background(), key, 150*kib); err != nil {
		t.Fatalf("a could not reserve after b released: %v", err)
	} else {
		r(false)
	}
}
