package peers

import (
	"bytes"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"
)

// serveBytes listens on loopback and writes data to every connection, then closes it.
func serveBytes(t *testing.T, data []byte) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = c.Write(data)
			}()
		}
	}()
	return ln.Addr().String()
}

// Bytes pass through intact, and no faster than the limit: 1 MiB at 2 MiB/s takes at
// least half a second, less the one read the limiter lets through at once.
func TestRateLimitProxyRelaysAtMostTheRate(t *testing.T) {
	data := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{1}).Read(data)
	const rate = 2 << 20
	p := StartRateLimitProxy(t, serveBytes(t, data), rate)

	for i := range 2 { // two connections one after the other: each has its own limit
		start := time.Now()
		c, err := net.Dial("tcp", p.Addr)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(c)
		c.Close()
		took := time.Since(start)
		if err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(got) != sha256.Sum256(data) {
			t.Fatalf("connection %d: relayed %d bytes, not the %d served", i, len(got), len(data))
		}
		floor := time.Duration(float64(len(data)-rateLimitBurst) / rate * float64(time.Second))
		if took < floor {
			t.Fatalf("connection %d: %d bytes in %v at %d bytes/s: want at least %v", i, len(data), took, rate, floor)
		}
		t.Logf("connection %d: %d bytes in %v (floor %v)", i, len(data), took, floor)
	}
	if n := p.Connections(); n != 2 {
		t.Fatalf("Connections() = %d, want 2", n)
	}
}

// Stop ends a connection still relaying (the client sees its end), and a connection
// after Stop is refused.
func TestRateLimitProxyStopClosesConnections(t *testing.T) {
	data := bytes.Repeat([]byte{'x'}, 4<<20) // 16 s at the rate below
	p := StartRateLimitProxy(t, serveBytes(t, data), 256<<10)
	c, err := net.Dial("tcp", p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.ReadFull(c, make([]byte, 1024)); err != nil {
		t.Fatal(err)
	}
	p.Stop()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	n, err := io.Copy(io.Discard, c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("the connection was still open 30 s after Stop (%d more bytes)", n)
	}
	if int(n)+1024 >= len(data) {
		t.Fatalf("read all %d bytes: Stop did not cut the relay", len(data))
	}
	if c2, err := net.DialTimeout("tcp", p.Addr, time.Second); err == nil {
		c2.Close()
		t.Fatal("a connection after Stop was accepted")
	}
}
