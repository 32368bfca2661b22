package peers

import (
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Balancer is a TCP load balancer in front of cove-cache replicas, the way a Kubernetes
// Service is to its clients: each new connection goes to the next endpoint in turn, and
// connections already open stay where they are. Remove and Add change the endpoints as an
// EndpointSlice update does once it reaches a node; a test that delays Remove after a
// replica's SIGTERM plays the time that takes. A connection whose endpoint cannot be
// dialled is closed at once, as kube-proxy's reset is, and counted (DialFailures).
type Balancer struct {
	// Addr is 127.0.0.1:PORT; URL is http://Addr.
	Addr, URL string

	ln           net.Listener
	dialFailures atomic.Int64

	mu        sync.Mutex
	endpoints []string
	next      int
	conns     map[net.Conn]struct{}
	wg        sync.WaitGroup
}

// StartBalancer starts a Balancer over endpoints (host:port), stopped at cleanup.
func StartBalancer(t testing.TB, endpoints ...string) *Balancer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("peers: balancer: %v", err)
	}
	b := &Balancer{Addr: ln.Addr().String(), ln: ln, endpoints: slices.Clone(endpoints), conns: map[net.Conn]struct{}{}}
	b.URL = "http://" + b.Addr
	b.wg.Add(1)
	go b.accept()
	t.Cleanup(b.stop)
	return b
}

// Remove takes endpoint out of the rotation; open connections to it are left alone.
func (b *Balancer) Remove(endpoint string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.endpoints = slices.DeleteFunc(b.endpoints, func(e string) bool { return e == endpoint })
}

// Add puts endpoint (back) into the rotation.
func (b *Balancer) Add(endpoint string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !slices.Contains(b.endpoints, endpoint) {
		b.endpoints = append(b.endpoints, endpoint)
	}
}

// DialFailures is the number of connections closed because their endpoint refused them.
func (b *Balancer) DialFailures() int64 { return b.dialFailures.Load() }

func (b *Balancer) pick() (string, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.endpoints) == 0 {
		return "", false
	}
	b.next = (b.next + 1) % len(b.endpoints)
	return b.endpoints[b.next], true
}

func (b *Balancer) stop() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// track adds or drops an open connection, which stop closes.
func (b *Balancer) track(c net.Conn, add bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if add {
		b.conns[c] = struct{}{}
	} else {
		delete(b.conns, c)
	}
}

func (b *Balancer) accept() {
	defer b.wg.Done()
	for {
		client, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.wg.Add(1)
		go b.relay(client)
	}
}

func (b *Balancer) relay(client net.Conn) {
	defer b.wg.Done()
	defer client.Close()
	endpoint, ok := b.pick()
	if !ok {
		b.dialFailures.Add(1)
		return
	}
	server, err := net.DialTimeout("tcp", endpoint, 2*time.Second)
	if err != nil {
		b.dialFailures.Add(1)
		return
	}
	defer server.Close()
	b.track(client, true)
	b.track(server, true)
	defer b.track(client, false)
	defer b.track(server, false)
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite() // pass the half-close on, as a NAT does
		}
		done <- struct{}{}
	}
	go pipe(server, client)
	go pipe(client, server)
	<-done
	<-done
}
