package fill

import (
	"bytes"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"
)

// JoinRunning joins a fill in flight and reads the whole blob from it, one origin fetch
// in all; with nothing in flight (before, and once the fill ended) it returns nil and
// never starts a fill.
func TestJoinRunningNeverStartsAFill(t *testing.T) {
	body := randomBytes(t, 2<<20+5)
	key := Key{Registry: "r.test", Digest: digest.FromBytes(body)}
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, nil)
	m, c, _ := newManager(t)
	if f := m.JoinRunning(key, "b", 0, get(origin.URL)); f != nil {
		t.Fatal("JoinRunning with nothing in flight returned a fill")
	}
	if n := m.InFlight(); n != 0 || calls.Load() != 0 {
		t.Fatalf("JoinRunning started something: %d fills, %d origin calls", n, calls.Load())
	}
	first, started := m.Join(key, "a", get(origin.URL))
	if !started {
		t.Fatal("Join did not start the fill")
	}
	joined := m.JoinRunning(key, "b", 1<<20, get(origin.URL))
	if joined != first {
		t.Fatalf("JoinRunning = %p, want the fill in flight %p", joined, first)
	}
	got, err := readAll(joined, 1<<20, int64(len(body))-1<<20)
	joined.Release()
	if err != nil || !bytes.Equal(got, body[1<<20:]) {
		t.Fatalf("reading the joined fill from 1 MiB: %d bytes, %v", len(got), err)
	}
	if _, err := readAll(first, 0, int64(len(body))); err != nil {
		t.Fatal(err)
	}
	first.Release()
	waitGone(t, m)
	if _, ok := c.get(key.Digest); !ok {
		t.Fatal("the fill was not committed")
	}
	if f := m.JoinRunning(key, "b", 0, get(origin.URL)); f != nil {
		t.Fatal("JoinRunning after the fill ended returned a fill")
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("%d origin fetches, want 1", n)
	}
}
