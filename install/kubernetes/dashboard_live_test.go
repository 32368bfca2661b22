package kubernetes_test

import (
	"net"
	"slices"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/cove-oci/cove/internal/peers"
)

// TestDashboardMetricsExported: every metric every dashboard query selects is exported
// by a live cove-cache (or, cove_node_*, a live cove-node's metrics listener, which the
// PodMonitor scrapes) after an image was pulled through both, with every label the query
// names, and the exact label values it matches on.
func TestDashboardMetricsExported(t *testing.T) {
	queries := dashboardQueries(t, build(t, dir()))
	// The panels the issue asks for: hit ratio, egress saved per registry, fills,
	// fallbacks, origin checks, store usage.
	for _, want := range []string{"Hit ratio", "Egress saved per registry", "Fills by result",
		"Requests that went round cove-cache", "Authorization checks at origins", "Store usage"} {
		if !slices.ContainsFunc(queries, func(q dashboardQuery) bool { return q.panel == want }) {
			t.Errorf("no panel %q", want)
		}
	}

	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 2, 256<<10)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)
	// Prometheus scrapes cove-node where the PodMonitor points: the metrics listener
	// (--metrics-addr, written as the DaemonSet writes it), not the loopback hook.
	metricsPort := freePort(t)
	node := peers.StartCoveNode(t, []string{cove.URL}, "--origin-plain-http", origin.Addr,
		"--metrics-addr", "[127.0.0.1]:"+metricsPort)
	pullThrough(t, node.URL, origin.Addr, img) // misses: fills
	pullThrough(t, node.URL, origin.Addr, img) // hits
	cacheFams, nodeFams := scrape(t, cove.URL), scrape(t, "http://127.0.0.1:"+metricsPort)

	checked := 0
	for _, q := range queries {
		uses, err := queryUses(q.expr)
		if err != nil {
			t.Errorf("panel %q: query %q does not parse: %v", q.panel, q.expr, err)
			continue
		}
		if len(uses) == 0 {
			t.Errorf("panel %q: query %q selects no metric", q.panel, q.expr)
		}
		for _, u := range uses {
			fams, who := cacheFams, "cove-cache"
			if strings.HasPrefix(u.metric, "cove_node_") {
				fams, who = nodeFams, "cove-node"
			}
			if err := checkUse(fams, u); err != nil {
				t.Errorf("panel %q: %s: %v", q.panel, who, err)
			}
			checked++
		}
	}
	t.Logf("%d queries, %d metric selections checked against live cove-cache and cove-node", len(queries), checked)
}

// TestDashboardCheckCatchesMistakes: the attack on the check: an unknown metric, a
// label the metric lacks, a value never seen, and a histogram's series.
func TestDashboardCheckCatchesMistakes(t *testing.T) {
	name := func(s string) *string { return &s }
	hist := dto.MetricType_HISTOGRAM
	counter := dto.MetricType_COUNTER
	fams := map[string]*dto.MetricFamily{
		"cove_requests_total": {Name: name("cove_requests_total"), Type: &counter, Metric: []*dto.Metric{{
			Label: []*dto.LabelPair{{Name: name("result"), Value: name("hit")}}}}},
		"cove_fill_duration_seconds": {Name: name("cove_fill_duration_seconds"), Type: &hist, Metric: []*dto.Metric{{
			Label: []*dto.LabelPair{{Name: name("result"), Value: name("ok")}}}}},
	}
	for expr, wantErr := range map[string]string{
		`sum(rate(cove_requests_total{result="hit"}[$__rate_interval]))`:                               "",
		`histogram_quantile(0.9, sum by (le) (rate(cove_fill_duration_seconds_bucket[5m])))`:           "",
		`sum by (result) (rate(cove_fill_duration_seconds_count[5m]))`:                                 "",
		`sum(rate(cove_request_total[5m]))`:                                                            "not exported",
		`sum by (registry) (rate(cove_requests_total[5m]))`:                                            `no label "registry"`,
		`sum(rate(cove_requests_total{result="hits"}[5m]))`:                                            `no series with result="hits"`,
		`sum(rate(cove_requests_total{result="hit"}[5m])) / sum(rate(cove_fill_duration_seconds[5m]))`: "cove_fill_duration_seconds is not exported",
	} {
		uses, err := queryUses(expr)
		if err != nil {
			t.Fatalf("%s: %v", expr, err)
		}
		var got error
		for _, u := range uses {
			if err := checkUse(fams, u); err != nil && got == nil {
				got = err
			}
		}
		if (wantErr == "") != (got == nil) || (got != nil && !strings.Contains(got.Error(), wantErr)) {
			t.Errorf("%s: error %v, want %q", expr, got, wantErr)
		}
	}
	if _, err := queryUses(`sum(rate(cove_requests_total[5m])`); err == nil {
		t.Error("an unbalanced query parsed")
	}
}

// freePort is a TCP port free on 127.0.0.1 now (the process given it binds it soon after).
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}
