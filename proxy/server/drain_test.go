package server_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
)

// TestDrainFailsReadinessOnly: once Drain is called /readyz answers 503 with the reason,
// for good, while liveness, metrics and pulls go on being served.
func TestDrainFailsReadinessOnly(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 64<<10)
	c := newCache(t, origin.Addr)
	mustGet(t, c.http.URL+"/readyz", nil, http.StatusOK)
	if c.srv.Draining() {
		t.Fatal("Draining before Drain")
	}

	c.srv.Drain("SIGTERM received")
	_, body := mustGet(t, c.http.URL+"/readyz", nil, http.StatusServiceUnavailable)
	if !strings.Contains(string(body), "draining: SIGTERM received since ") {
		t.Fatalf("readyz body %q does not name the reason", body)
	}
	first := string(body)
	time.Sleep(1100 * time.Millisecond) // a second Drain must not move "since" (RFC 3339 seconds)
	c.srv.Drain("another reason")
	_, body = mustGet(t, c.http.URL+"/readyz", nil, http.StatusServiceUnavailable)
	if string(body) != first {
		t.Fatalf("a second Drain changed the answer: %q, was %q", body, first)
	}
	if !c.srv.Draining() {
		t.Fatal("Draining false after Drain")
	}

	mustGet(t, c.http.URL+"/healthz", nil, http.StatusOK)
	mustGet(t, c.http.URL+"/metrics", nil, http.StatusOK)
	// A pull while draining is served in full: draining is for the Service, not the client.
	_, blob := mustGet(t, c.url(origin.Addr, "/v2/team/app/blobs/"+img.Layers[0]), nil, http.StatusOK)
	if got := sha(blob); got != img.Layers[0] {
		t.Fatalf("blob while draining: digest %s, want %s", got, img.Layers[0])
	}
}
