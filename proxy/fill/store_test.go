package fill

import (
	"bytes"
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"
)

// A blob larger than the whole store passes through without degrading the store: no
// eviction would ever make room for it, so it says nothing about the store's health.
func TestLargerThanStorePassesThroughHealthy(t *testing.T) {
	body := randomBytes(t, 1<<20+3)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, nil)
	var ev events
	tooLarge := func(context.Context, Key, int64) (func(bool), error) {
		return nil, fmt.Errorf("%w: 1 MiB blob, store of 64 KiB", ErrLargerThanStore)
	}
	m, c, dir := newManager(t, WithReserve(tooLarge), WithEvents(ev.hooks()), WithPassThroughWindow(1<<20))
	f, _ := m.Join(Key{Registry: "r", Digest: d}, "o", get(origin.URL))
	if got, err := readAll(f, 0, -1); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read: %v, equal %v", err, bytes.Equal(got, body))
	}
	f.Release()
	waitGone(t, m)
	if _, ok := c.get(d); ok {
		t.Fatal("a blob larger than the store was stored")
	}
	assertSpoolEmpty(t, dir)
	if cond, degraded := m.StoreDegraded(); degraded {
		t.Fatalf("degraded by a blob larger than the store: %+v", cond)
	}
	if _, passed, _, conditions := ev.snapshot(); fmt.Sprint(passed) != "["+ReasonLargerThanStore+"]" || len(conditions) != 0 {
		t.Fatalf("passed through %v, conditions %v", passed, conditions)
	}
}

// A request that found the store without a blob just before a fill committed it, and
// asks to join just after the fill ended, is sent to the store (JoinAt returns nil), not
// given a second origin fetch; once told the store lost it (ForgetStored), it fetches.
func TestJoinAtAfterStoredFillReadsTheStore(t *testing.T) {
	body := randomBytes(t, 256<<10)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, nil)
	m, c, _ := newManager(t)
	key := Key{Registry: "r", Digest: d}
	f, _ := m.JoinAt(key, "o", 0, get(origin.URL))
	if got, err := readAll(f, 0, -1); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read: %v", err)
	}
	f.Release()
	waitGone(t, m)
	if _, ok := c.get(d); !ok {
		t.Fatal("not stored")
	}
	if f, started := m.JoinAt(key, "o", 1<<10, get(origin.URL)); f != nil || started {
		t.Fatalf("JoinAt after the fill stored its blob: %v, started %v; want nil (read the store)", f, started)
	}
	m.ForgetStored(key)
	f, started := m.JoinAt(key, "o", 0, get(origin.URL))
	if f == nil || !started {
		t.Fatal("JoinAt after ForgetStored did not start a fill")
	}
	if got, err := readAll(f, 0, -1); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read: %v", err)
	}
	f.Release()
	waitGone(t, m)
	if n := calls.Load(); n != 2 {
		t.Fatalf("origin calls = %d, want 2", n)
	}
}
