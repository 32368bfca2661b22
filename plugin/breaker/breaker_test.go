package breaker

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestOpensBacksOffAndCloses(t *testing.T) {
	var healthy atomic.Bool
	var mu sync.Mutex
	var changes []bool
	b := New(func(context.Context) bool { return healthy.Load() },
		WithBackoff(200*time.Millisecond, 800*time.Millisecond),
		WithProbeInterval(20*time.Millisecond),
		WithOnChange(func(open bool) { mu.Lock(); changes = append(changes, open); mu.Unlock() }))
	backoff := func() time.Duration { b.mu.Lock(); defer b.mu.Unlock(); return b.backoff }
	if !b.Allow() {
		t.Fatal("new breaker is open")
	}
	b.Failure()
	if b.Allow() {
		t.Fatal("breaker closed right after a failure")
	}
	b.Failure() // a failure while open doubles the back-off
	if backoff() != 400*time.Millisecond {
		t.Fatalf("backoff = %s", backoff())
	}
	for range 5 {
		b.Failure()
	}
	if backoff() != 800*time.Millisecond {
		t.Fatalf("backoff not capped: %s", backoff())
	}
	healthy.Store(true)
	deadline := time.Now().Add(2 * time.Second)
	for !b.Allow() {
		if time.Now().After(deadline) {
			t.Fatal("probe never closed the breaker")
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	b.Success()
	mu.Lock()
	defer mu.Unlock()
	if backoff() != 0 || len(changes) != 2 || !changes[0] || changes[1] {
		t.Fatalf("backoff %s, changes %v", backoff(), changes)
	}
}

// While probes fail, the breaker stays open past its back-off.
func TestStaysOpenWhileProbesFail(t *testing.T) {
	b := New(func(context.Context) bool { return false },
		WithBackoff(100*time.Millisecond, 100*time.Millisecond), WithProbeInterval(20*time.Millisecond))
	b.Failure()
	time.Sleep(400 * time.Millisecond)
	if b.Allow() {
		t.Fatal("breaker closed while its probes still fail")
	}
}
