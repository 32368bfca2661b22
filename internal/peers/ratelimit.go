package peers

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/time/rate"
)

// RateLimitProxy is a TCP proxy in front of a server (a registry) that limits each
// connection on its own to a number of bytes per second in each direction: a link
// across a WAN, where what one TCP connection carries is bounded by its window and the
// round trip rather than by the path, so N connections carry about N times as much.
// This is the case parallel ranged fills are for; a proxy limiting all connections
// together would model a saturated link instead.
type RateLimitProxy struct {
	// Addr is 127.0.0.1:PORT, the address to use as the server's.
	Addr string
	// BytesPerSecond is each connection's limit, each way.
	BytesPerSecond int

	target string
	ln     net.Listener
	ctx    context.Context
	cancel context.CancelFunc
	conns  atomic.Int64 // connections accepted

	mu   sync.Mutex
	open map[net.Conn]struct{}
	wg   sync.WaitGroup
}

// rateLimitBurst is the most one read may relay before it waits for the limiter: small
// next to a second's worth at the rates tests use (MiB/s), so the limit holds at every
// scale above a few hundred milliseconds.
const rateLimitBurst = 64 << 10

// StartRateLimitProxy starts a RateLimitProxy in front of target (host:port) that
// relays at most bytesPerSecond per connection each way; stopped at cleanup.
func StartRateLimitProxy(t testing.TB, target string, bytesPerSecond int) *RateLimitProxy {
	t.Helper()
	if bytesPerSecond < rateLimitBurst {
		t.Fatalf("peers: rate limit proxy: %d bytes/s is below one read (%d bytes)", bytesPerSecond, rateLimitBurst)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("peers: rate limit proxy: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &RateLimitProxy{
		Addr: ln.Addr().String(), BytesPerSecond: bytesPerSecond,
		target: target, ln: ln, ctx: ctx, cancel: cancel, open: map[net.Conn]struct{}{},
	}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Stop)
	return p
}

// Connections is the number of connections the proxy has accepted.
func (p *RateLimitProxy) Connections() int64 { return p.conns.Load() }

// Stop closes the listener and every relayed connection and waits for the relays to
// end. Idempotent.
func (p *RateLimitProxy) Stop() {
	p.cancel()
	p.ln.Close()
	p.mu.Lock()
	for c := range p.open {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// track records c as open (add) or closed; it refuses (false) once the proxy stopped,
// so a connection accepted during Stop is not left behind.
func (p *RateLimitProxy) track(c net.Conn, add bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !add {
		delete(p.open, c)
		return true
	}
	if p.ctx.Err() != nil {
		return false
	}
	p.open[c] = struct{}{}
	return true
}

func (p *RateLimitProxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.conns.Add(1)
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		if !p.track(client, true) || !p.track(server, true) {
			client.Close()
			server.Close()
			return
		}
		p.wg.Add(2)
		done := make(chan struct{})
		go func() {
			defer p.wg.Done()
			p.copy(server, client)
			<-done
			p.track(client, false)
			p.track(server, false)
		}()
		go func() {
			defer p.wg.Done()
			defer close(done)
			p.copy(client, server)
		}()
	}
}

// copy relays src to dst through a limiter of its own until either side ends or fails,
// then closes both, so the other direction ends too (HTTP clients do not half-close).
func (p *RateLimitProxy) copy(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	lim := rate.NewLimiter(rate.Limit(p.BytesPerSecond), rateLimitBurst)
	buf := make([]byte, rateLimitBurst)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if werr := lim.WaitN(p.ctx, n); werr != nil {
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}
