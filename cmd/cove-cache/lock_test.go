package main

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

// Two cove-cache processes on one --storage-dir: the second is refused at start with an
// error naming the directory and the first one's pid, and touches nothing, so the first
// one's fill in flight is stored; after the first is killed with SIGKILL (the kernel
// drops its lock), a new process starts on the directory and serves what it stored.
func TestSecondProcessOnStorageDirRefused(t *testing.T) {
	blob := make([]byte, 1<<20)
	_, _ = rand.Read(blob)
	d := digest.FromBytes(blob).String()
	halfSent, release := make(chan struct{}), make(chan struct{})
	var halfOnce sync.Once
	var gets atomic.Int32
	// An origin that sends the blob's first half, then waits for the test.
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/v2/team/app/blobs/"+d {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(blob)))
		w.Header().Set("Docker-Content-Digest", d)
		if r.Method == http.MethodHead {
			return
		}
		gets.Add(1)
		_, _ = w.Write(blob[:len(blob)/2])
		w.(http.Flusher).Flush()
		halfOnce.Do(func() { close(halfSent) })
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		_, _ = w.Write(blob[len(blob)/2:])
	}))
	defer origin.Close()
	var releaseOnce sync.Once
	defer releaseOnce.Do(func() { close(release) })
	originAddr := strings.TrimPrefix(origin.URL, "http://")
	dir := t.TempDir()
	flags := []string{"--origin-plain-http", originAddr}

	first := peers.StartCove(t, dir, flags...)
	blobURL := func(c *peers.Cove) string {
		return c.URL + "/v2/team/app/blobs/" + d + "?ns=" + url.QueryEscape(originAddr)
	}
	type result struct {
		status int
		body   []byte
		err    error
	}
	got := make(chan result, 1)
	go func() {
		resp, err := http.Get(blobURL(first))
		if err != nil {
			got <- result{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		got <- result{resp.StatusCode, b, err}
	}()
	select {
	case <-halfSent:
	case <-time.After(10 * time.Second):
		t.Fatal("the fill never reached the origin")
	}

	// The second process, while the first one's fill is in flight.
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, peers.CoveBinary(t, "cove-cache"),
		append([]string{"serve", "--addr", "127.0.0.1:0", "--storage-dir", dir}, flags...)...)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Fatalf("second cove-cache on %s: %v (want exit status 1)\n%s", dir, err, out)
	}
	pid := strconv.Itoa(first.Pid())
	for _, want := range []string{"storage directory in use by another process", dir, "pid " + pid, `"pid":` + pid} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("second cove-cache's error does not say %q:\n%s", want, out)
		}
	}

	// The first keeps serving: its fill completes and is stored.
	releaseOnce.Do(func() { close(release) })
	r := <-got
	if r.err != nil || r.status != 200 || digest.FromBytes(r.body).String() != d {
		t.Fatalf("the first cove-cache's fill: status %d, %d bytes, %v", r.status, len(r.body), r.err)
	}
	waitFillsSettled(t, first)
	warm(t, blobURL(first), d)
	if n := gets.Load(); n != 1 {
		t.Fatalf("origin GETs = %d, want 1: the fill in flight was not stored", n)
	}

	// kill -9: the kernel drops the lock, and a new process starts on the directory.
	first.Kill9()
	again := peers.StartCove(t, dir, flags...)
	warm(t, blobURL(again), d)
	if n := gets.Load(); n != 1 {
		t.Fatalf("origin GETs = %d after the restart, want 1", n)
	}
}

func waitFillsSettled(t *testing.T, c *peers.Cove) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); c.Metric(t, "cove_fills_in_flight") > 0; {
		if time.Now().After(deadline) {
			t.Fatal("fills did not settle")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// warm GETs u and checks it is the blob d.
func warm(t *testing.T, u, d string) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 || digest.FromBytes(b).String() != d {
		t.Fatalf("GET %s: %d, %d bytes, %v", u, resp.StatusCode, len(b), err)
	}
}
