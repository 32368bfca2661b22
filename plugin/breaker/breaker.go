// Package breaker is cove-node's circuit breaker for one cove-cache: after a failure it
// sends requests straight to the origin for a back-off period, while a background probe
// watches cove-cache come back.
package breaker

import (
	"context"
	"net/http"
	"sync"
	"time"
)

// Breaker tracks one cache endpoint.
type Breaker struct {
	probe      func(ctx context.Context) bool
	minBackoff time.Duration
	maxBackoff time.Duration
	interval   time.Duration
	now        func() time.Time

	mu        sync.Mutex
	openUntil time.Time
	backoff   time.Duration
	probing   bool
	onChange  func(open bool)
}

// Option configures a Breaker.
type Option func(*Breaker)

// WithBackoff sets the first and the longest open period (default 2 s and 1 min); each
// failure while open doubles it.
func WithBackoff(min, max time.Duration) Option {
	return func(b *Breaker) { b.minBackoff, b.maxBackoff = min, max }
}

// WithProbeInterval sets how often an open breaker probes the cache (default 500 ms).
func WithProbeInterval(d time.Duration) Option { return func(b *Breaker) { b.interval = d } }

// WithOnChange is called when the breaker opens (true) or closes (false).
func WithOnChange(fn func(open bool)) Option { return func(b *Breaker) { b.onChange = fn } }

// New returns a closed breaker; probe reports whether the cache is healthy.
func New(probe func(ctx context.Context) bool, opts ...Option) *Breaker {
	b := &Breaker{
		probe:      probe,
		minBackoff: 2 * time.Second,
		maxBackoff: time.Minute,
		interval:   500 * time.Millisecond,
		now:        time.Now,
	}
	for _, o := range opts {
		o(b)
	}
	return b
}

// Allow reports whether requests may go to the cache now.
func (b *Breaker) Allow() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.now().Before(b.openUntil)
}

// Open reports whether the breaker is open (requests bypass the cache).
func (b *Breaker) Open() bool { return !b.Allow() }

// Failure records a cache failure: the breaker opens for the back-off period, and a
// probe starts watching for the cache to come back (closing the breaker early).
func (b *Breaker) Failure() {
	b.mu.Lock()
	wasOpen := b.now().Before(b.openUntil)
	if b.backoff == 0 {
		b.backoff = b.minBackoff
	} else if wasOpen {
		b.backoff = min(2*b.backoff, b.maxBackoff)
	}
	b.openUntil = b.now().Add(b.backoff)
	startProbe := !b.probing
	b.probing = true
	onChange := b.onChange
	b.mu.Unlock()
	if !wasOpen && onChange != nil {
		onChange(true)
	}
	if startProbe {
		go b.watch()
	}
}

// Success records a good answer: the back-off resets.
func (b *Breaker) Success() {
	b.mu.Lock()
	b.backoff = 0
	b.mu.Unlock()
}

// watch probes until the cache answers healthy, then closes the breaker; every failed
// probe keeps it open for another back-off period.
func (b *Breaker) watch() {
	t := time.NewTicker(b.interval)
	defer t.Stop()
	for range t.C {
		ctx, cancel := context.WithTimeout(context.Background(), b.interval)
		ok := b.probe(ctx)
		cancel()
		b.mu.Lock()
		if ok {
			wasOpen := b.now().Before(b.openUntil)
			b.openUntil = time.Time{}
			b.probing = false
			onChange := b.onChange
			b.mu.Unlock()
			if wasOpen && onChange != nil {
				onChange(false)
			}
			return
		}
		// Still failing: stay open. Without this the back-off would run out while the
		// cache is still dead, and the next request would pay the detection again.
		if until := b.now().Add(b.backoff); until.After(b.openUntil) {
			b.openUntil = until
		}
		b.mu.Unlock()
	}
}

// HealthProbe returns a probe that GETs url (cove-cache's /healthz) and expects 200.
func HealthProbe(client *http.Client, url string) func(ctx context.Context) bool {
	return func(ctx context.Context) bool {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return false
		}
		resp, err := client.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
}
