package metrics

import (
	"fmt"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestRegistryLabelIsBounded(t *testing.T) {
	m := New(func() int { return 0 })
	for i := range 1000 {
		m.FromOrigin(fmt.Sprintf("r%d.example", i), 1)
	}
	if n := testutil.CollectAndCount(m.OriginBytes); n > 201 {
		t.Fatalf("%d registry label values: clients could blow up cardinality", n)
	}
	if got := testutil.ToFloat64(m.OriginBytes.WithLabelValues("other")); got != 800 {
		t.Fatalf("other = %v, want 800", got)
	}
}

func TestCounters(t *testing.T) {
	m := New(func() int { return 3 })
	m.Request("blob", ResultHit)
	m.Sent("ghcr.io", "cache", 100)
	m.OriginRequest("ghcr.io", 401, nil)
	m.OriginRequest("ghcr.io", 0, fmt.Errorf("refused"))
	if testutil.ToFloat64(m.Requests.WithLabelValues("blob", "hit")) != 1 ||
		testutil.ToFloat64(m.BytesSent.WithLabelValues("ghcr.io", "cache")) != 100 ||
		testutil.ToFloat64(m.OriginRequests.WithLabelValues("ghcr.io", "401")) != 1 ||
		testutil.ToFloat64(m.OriginRequests.WithLabelValues("ghcr.io", "error")) != 1 ||
		testutil.ToFloat64(m.FillsInFlight) != 3 {
		t.Fatal("counter values")
	}
}
