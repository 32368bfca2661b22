package peers

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
)

// serveName starts an HTTP server on loopback that answers its own name.
func serveName(t *testing.T, name string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, name) })}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func TestBalancerRotatesRemovesAndCountsRefusals(t *testing.T) {
	a, c := serveName(t, "a"), serveName(t, "c")
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := closed.Addr().String()
	closed.Close()
	b := StartBalancer(t, a, c)
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	get := func() (string, error) {
		resp, err := client.Get(b.URL)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		return string(body), err
	}
	seen := map[string]int{}
	for range 4 {
		name, err := get()
		if err != nil {
			t.Fatal(err)
		}
		seen[name]++
	}
	if seen["a"] != 2 || seen["c"] != 2 {
		t.Fatalf("4 connections went %v, want 2 each", seen)
	}
	b.Remove(a)
	for range 3 {
		if name, err := get(); err != nil || name != "c" {
			t.Fatalf("after Remove(a): %q, %v", name, err)
		}
	}
	b.Remove(c)
	b.Add(gone)
	if _, err := get(); err == nil {
		t.Fatal("a refused endpoint answered")
	}
	if got := b.DialFailures(); got != 1 {
		t.Fatalf("DialFailures = %d, want 1", got)
	}
}
