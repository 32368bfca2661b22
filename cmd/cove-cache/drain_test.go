package main

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

// TestDrainKeepsBodiesWhole: SIGTERM in the middle of a cold blob's body. /readyz answers
// 503 at once, a new request during the grace is still served, the listener then closes
// while the body is still being read, the body completes intact, a fill whose client had
// gone finishes and is stored, and the process exits 0. A restart on the same storage
// serves both blobs without asking the origin again.
func TestDrainKeepsBodiesWhole(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 2, 48<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr,
		"--shutdown-grace", "2s", "--shutdown-timeout", "2m")
	blobURL := func(c *peers.Cove, d string) string {
		return c.URL + "/v2/team/app/blobs/" + d + "?ns=" + url.QueryEscape(origin.Addr)
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}

	// The body read slowly, across the signal and the listener's closing.
	slow, err := client.Get(blobURL(cove, img.Layers[0]))
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Body.Close()
	if slow.StatusCode != http.StatusOK {
		t.Fatalf("cold blob: status %d", slow.StatusCode)
	}
	verifier := digest.Digest(img.Layers[0]).Verifier()
	head, err := io.CopyN(verifier, slow.Body, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	// A fill whose only client leaves before the signal.
	left, err := client.Get(blobURL(cove, img.Layers[1]))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(io.Discard, left.Body, 4096); err != nil {
		t.Fatal(err)
	}
	left.Body.Close()

	if err := cove.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ready := waitReadyz(t, cove.URL, http.StatusServiceUnavailable, 5*time.Second)
	if !strings.Contains(ready, "draining: SIGTERM received since ") {
		t.Fatalf("/readyz while draining: %q", ready)
	}
	// During the grace, a new request is served: kube-proxy may still send one.
	req, err := http.NewRequest(http.MethodGet, cove.URL+"/v2/team/app/manifests/v1?ns="+url.QueryEscape(origin.Addr), nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("a request during the grace failed: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("a manifest during the grace: status %d", resp.StatusCode)
	}
	// After the grace the listener closes; our body is still in flight.
	waitRefused(t, cove.Addr, 30*time.Second)
	if code, err := cove.WaitExit(200 * time.Millisecond); err == nil {
		t.Fatalf("cove-cache exited (%d) with a body still in flight", code)
	}
	rest, err := io.Copy(verifier, slow.Body)
	if err != nil {
		t.Fatalf("body cut after %d bytes: %v", head+rest, err)
	}
	if !verifier.Verified() {
		t.Fatalf("body of %d bytes does not match %s", head+rest, img.Layers[0])
	}
	code, err := cove.WaitExit(2 * time.Minute)
	if err != nil || code != 0 {
		t.Fatalf("exit after the drain: %d, %v", code, err)
	}
	logs := cove.Logs(t)
	if !hasLog(logs, "drained: nothing in flight") {
		t.Fatalf("no 'drained' log line: %v", logs)
	}

	before := origin.BlobGETs()
	again := peers.StartCove(t, cove.StorageDir, "--origin-plain-http", origin.Addr)
	for _, l := range img.Layers {
		resp, err := client.Get(blobURL(again, l))
		if err != nil {
			t.Fatal(err)
		}
		v := digest.Digest(l).Verifier()
		_, err = io.Copy(v, resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || !v.Verified() {
			t.Fatalf("%s after the restart: status %d, err %v, verified %v", l, resp.StatusCode, err, v.Verified())
		}
	}
	after := origin.BlobGETs()
	for _, l := range img.Layers {
		if before[l] != 1 || after[l] != 1 {
			t.Errorf("origin GETs of %s: %d before the restart, %d after; want 1 and 1 (the fill finished and was stored during the drain)", l, before[l], after[l])
		}
	}
}

// TestShutdownTimeoutCutsStuckClient: a client that stops reading cannot hold a draining
// replica past --shutdown-timeout (the kubelet would SIGKILL it anyway): the process cuts
// it, says so, and exits 1.
func TestShutdownTimeoutCutsStuckClient(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 48<<20)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr,
		"--shutdown-grace", "0s", "--shutdown-timeout", "1s")
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Get(cove.URL + "/v2/team/app/blobs/" + img.Layers[0] + "?ns=" + url.QueryEscape(origin.Addr))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if _, err := io.CopyN(io.Discard, resp.Body, 1<<20); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := cove.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	code, err := cove.WaitExit(30 * time.Second) // the bound is 1 s; the rest is a slow machine
	if err != nil || code != 1 {
		t.Fatalf("exit with a stuck client: %d, %v (after %s)", code, err, time.Since(start))
	}
	if !hasLog(cove.Logs(t), "shutdown incomplete: requests still in flight were cut") {
		t.Fatal("no log line says the shutdown cut a request")
	}
	if _, err := io.Copy(io.Discard, resp.Body); err == nil {
		t.Fatal("the stuck client's body ended cleanly, but the shutdown cut it")
	}
}

func TestShutdownFlagsRefused(t *testing.T) {
	for _, args := range [][]string{
		{"serve", "--shutdown-grace", "-1s"},
		{"serve", "--shutdown-timeout", "0s"},
	} {
		var stdout, stderr bytes.Buffer
		if code := run(args, &stdout, &stderr); code != 2 || !strings.Contains(stderr.String(), "--shutdown-") {
			t.Errorf("run(%q) = %d, stderr %q; want exit 2 naming the flag", args, code, stderr.String())
		}
	}
}

// waitReadyz polls /readyz until it answers want, and returns its body.
func waitReadyz(t *testing.T, base string, want int, within time.Duration) string {
	t.Helper()
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	deadline := time.Now().Add(within)
	for {
		resp, err := client.Get(base + "/readyz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == want {
				return string(body)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz did not answer %d within %s (last: %v)", want, within, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitRefused waits until addr refuses connections (the listener closed).
func waitRefused(t *testing.T, addr string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatalf("%s still accepts connections %s after SIGTERM", addr, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func hasLog(logs []map[string]any, msg string) bool {
	for _, l := range logs {
		if l["msg"] == msg {
			return true
		}
	}
	return false
}
