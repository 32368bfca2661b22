package peers

import (
	"bytes"
	"net"
	"sync"
	"testing"
)

// CutProxy is a TCP proxy in front of a registry that drops the connection of the first
// blob GET whose response runs past a number of bytes: an origin connection lost in the
// middle of a blob. Everything else, later GETs of the same blob included, is relayed.
type CutProxy struct {
	// Addr is 127.0.0.1:PORT, the address to use as the registry's.
	Addr string

	target   string
	cutAfter int64
	ln       net.Listener

	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// StartCutProxy starts a CutProxy in front of target (host:port) that cuts the first
// blob GET response after cutAfter bytes (headers included); stopped at cleanup.
func StartCutProxy(t testing.TB, target string, cutAfter int64) *CutProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("peers: cut proxy: %v", err)
	}
	p := &CutProxy{Addr: ln.Addr().String(), target: target, cutAfter: cutAfter, ln: ln, conns: map[net.Conn]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.stop)
	return p
}

// Cut reports whether a connection has been cut.
func (p *CutProxy) Cut() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cut
}

func (p *CutProxy) stop() {
	p.ln.Close()
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *CutProxy) track(c net.Conn, add bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if add {
		p.conns[c] = struct{}{}
	} else {
		delete(p.conns, c)
	}
}

func (p *CutProxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		p.track(client, true)
		p.track(server, true)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.relay(client, server)
			p.track(client, false)
			p.track(server, false)
		}()
	}
}

// relay copies both ways. Requests on a connection come one at a time (no pipelining),
// so the bytes the server sends after a blob GET's request line are that GET's answer.
func (p *CutProxy) relay(client, server net.Conn) {
	var mu sync.Mutex
	armed, sent := false, int64(0) // the current request is a blob GET; bytes of its answer
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 32<<10)
		for {
			n, err := client.Read(buf)
			if n > 0 {
				if i := bytes.Index(buf[:n], []byte("GET /v2/")); i >= 0 {
					line, _, _ := bytes.Cut(buf[i:n], []byte("\r\n"))
					mu.Lock()
					armed, sent = bytes.Contains(line, []byte("/blobs/")), 0
					mu.Unlock()
				} else if bytes.Contains(buf[:n], []byte(" HTTP/1.1\r\n")) {
					mu.Lock()
					armed = false
					mu.Unlock()
				}
				if _, werr := server.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		server.Close()
		client.Close()
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := server.Read(buf)
		if n > 0 {
			out := buf[:n]
			cutNow := false
			mu.Lock()
			p.mu.Lock()
			if armed && !p.cut && sent+int64(n) >= p.cutAfter {
				out = out[:p.cutAfter-sent]
				p.cut, cutNow = true, true
			}
			p.mu.Unlock()
			sent += int64(len(out))
			mu.Unlock()
			if _, werr := client.Write(out); werr != nil || cutNow {
				break
			}
		}
		if err != nil {
			break
		}
	}
	client.Close()
	server.Close()
	<-done
}
