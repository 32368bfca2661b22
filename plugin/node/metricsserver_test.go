package node

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/plugin/mirror"
)

// startAgent starts cove-node's parts in mirror-only mode, relaying to the origin (no
// cove-cache), and closes it at cleanup.
func startAgent(t *testing.T, cfg Config) *Agent {
	t.Helper()
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	a, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(a.Close)
	return a
}

// requestsServed is the sum of cove_node_requests_total on base's /metrics.
func requestsServed(t *testing.T, base string) float64 {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s/metrics: %s", base, resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("%s/metrics: %v", base, err)
	}
	if fams["cove_node_caches_bypassed"] == nil || fams["go_goroutines"] == nil {
		t.Fatalf("%s/metrics lacks cove-node's own and the Go runtime's metrics: %v", base, keys(fams))
	}
	sum := 0.0
	if f := fams["cove_node_requests_total"]; f != nil {
		for _, m := range f.GetMetric() {
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func status(t *testing.T, method, u string) int {
	t.Helper()
	req, _ := http.NewRequest(method, u, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// TestMetricsListenerServesMetricsOnly: --metrics-addr binds where asked and serves the
// registry the resolver hook's /metrics serves; a pull request sent to it, by any route
// the mirror answers on the hook, gets a 404 and reaches neither the mirror nor the
// origin; it stops with the agent.
func TestMetricsListenerServesMetricsOnly(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 64<<10)
	a := startAgent(t, Config{Addr: "127.0.0.1:0", MetricsAddr: "127.0.0.1:0",
		Mirror: mirror.Config{Fallback: mirror.FallbackRelay, PlainHTTP: []string{origin.Addr}}})
	host, _, err := net.SplitHostPort(a.MetricsAddr)
	if err != nil || host != "127.0.0.1" || a.MetricsAddr == a.Addr {
		t.Fatalf("metrics listener on %q (hook on %q), want its own port on 127.0.0.1", a.MetricsAddr, a.Addr)
	}
	hook, metricsURL := "http://"+a.Addr, "http://"+a.MetricsAddr
	ns := "?ns=" + url.QueryEscape(origin.Addr)
	blob := "/v2/team/app/blobs/" + img.Layers[0] + ns

	if got := status(t, http.MethodGet, hook+blob); got != http.StatusOK {
		t.Fatalf("GET %s through the hook: %d, want 200 relayed from the origin", blob, got)
	}
	if n, m := requestsServed(t, hook), requestsServed(t, metricsURL); n != 1 || m != 1 {
		t.Fatalf("cove_node_requests_total: %v on the hook's /metrics, %v on the metrics listener; want 1 on both (one registry)", n, m)
	}
	if got := status(t, http.MethodGet, metricsURL+"/healthz"); got != http.StatusOK {
		t.Errorf("GET /healthz on the metrics listener: %d", got)
	}

	for _, r := range []struct{ method, path string }{
		{http.MethodGet, "/v2/"}, {http.MethodGet, "/v2"}, {http.MethodGet, blob},
		{http.MethodHead, "/v2/team/app/manifests/v1" + ns}, {http.MethodGet, "/v2/team/app/manifests/" + img.Digest + ns},
		{http.MethodGet, "/"}, {http.MethodGet, "/metrics/../v2/" + ns},
	} {
		if got := status(t, r.method, metricsURL+r.path); got != http.StatusNotFound {
			t.Errorf("%s %s on the metrics listener: %d, want 404", r.method, r.path, got)
		}
	}
	if got := status(t, http.MethodPost, metricsURL+"/metrics"); got != http.StatusMethodNotAllowed {
		t.Errorf("POST /metrics on the metrics listener: %d, want 405", got)
	}
	if n := requestsServed(t, metricsURL); n != 1 {
		t.Errorf("cove_node_requests_total %v after the requests to the metrics listener, want still 1: one reached the mirror", n)
	}

	a.Close()
	if c, err := net.DialTimeout("tcp", a.MetricsAddr, time.Second); err == nil {
		c.Close()
		t.Error("the metrics listener still accepts connections after Close")
	}
}

// TestMetricsListenerOff: without MetricsAddr there is no second listener.
func TestMetricsListenerOff(t *testing.T) {
	a := startAgent(t, Config{Addr: "127.0.0.1:0"})
	if a.MetricsAddr != "" {
		t.Errorf("MetricsAddr %q without a metrics address", a.MetricsAddr)
	}
}

// TestMetricsListenerBadAddress: an address that does not parse or cannot be bound fails
// Start with an error naming the metrics listener, and leaves nothing listening: the
// resolver hook's port is free again.
func TestMetricsListenerBadAddress(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	for addr, want := range map[string]string{
		"127.0.0.1":           "want HOST:PORT",
		":5007":               "name the host",
		"127.0.0.1:http":      "not a number",
		"127.0.0.1:65536":     "not a number",
		taken.Addr().String(): "metrics listener",
	} {
		free, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		hookAddr := free.Addr().String()
		free.Close()
		a, err := Start(context.Background(), Config{Addr: hookAddr, MetricsAddr: addr, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err == nil {
			a.Close()
			t.Errorf("MetricsAddr %q: Start succeeded", addr)
			continue
		}
		if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "metrics") {
			t.Errorf("MetricsAddr %q: %v, want an error about the metrics listener saying %q", addr, err, want)
		}
		ln, err := net.Listen("tcp", hookAddr)
		if err != nil {
			t.Errorf("MetricsAddr %q: the hook's %s is still held after the failed Start: %v", addr, hookAddr, err)
			continue
		}
		ln.Close()
	}
}
