package server

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// The peer collectors register once per registry, under the names docs/scaleout.md
// lists, with both request results exported from the start (a rejected count of 0 is an
// answer, not a missing series).
func TestPeerMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := newPeerMetrics(reg, func() []string { return nil })
	if err != nil {
		t.Fatal(err)
	}
	m.resumed("ranged")
	m.ownerDown.Inc()
	m.forwarded.WithLabelValues("owner").Inc()
	n, err := testutil.GatherAndCount(reg, "cove_peer_requests_total", "cove_peer_forwarded_total", "cove_peer_owner_down_total", "cove_peer_resumes_total")
	if err != nil {
		t.Fatal(err)
	}
	if n != 5 { // accepted, rejected, owner, the counter, ranged
		t.Fatalf("%d series, want 5", n)
	}
	if got := testutil.ToFloat64(m.resumes.WithLabelValues("ranged")); got != 1 {
		t.Fatalf("resumes = %v", got)
	}
	if _, err := newPeerMetrics(reg, func() []string { return nil }); err == nil {
		t.Fatal("the collectors registered twice on one registry")
	}
}
