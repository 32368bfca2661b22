package kubernetes_test

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/VictoriaMetrics/metricsql"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"

	"github.com/cove-oci/cove/internal/peers"
)

// dashboardQuery is one panel target of the Grafana dashboard.
type dashboardQuery struct {
	panel, expr string
}

// dashboardQueries reads the dashboard from the ConfigMap the kustomization makes and
// returns every panel query, rows' nested panels included.
func dashboardQueries(t *testing.T, b *built) []dashboardQuery {
	t.Helper()
	cm := get[*corev1.ConfigMap](t, b, "ConfigMap", namespace, "cove-grafana-dashboard")
	if cm.Labels["grafana_dashboard"] != "1" {
		t.Errorf("dashboard ConfigMap labels %v: Grafana's sidecar looks for grafana_dashboard", cm.Labels)
	}
	type panel struct {
		Title   string            `json:"title"`
		Type    string            `json:"type"`
		Panels  []json.RawMessage `json:"panels"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	}
	var dash struct {
		Title  string            `json:"title"`
		Panels []json.RawMessage `json:"panels"`
	}
	if err := json.Unmarshal([]byte(cm.Data["cove.json"]), &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	var out []dashboardQuery
	var walk func([]json.RawMessage)
	walk = func(raw []json.RawMessage) {
		for _, r := range raw {
			var p panel
			if err := json.Unmarshal(r, &p); err != nil {
				t.Fatalf("panel: %v", err)
			}
			walk(p.Panels)
			if p.Type != "row" && len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				out = append(out, dashboardQuery{p.Title, tg.Expr})
			}
		}
	}
	walk(dash.Panels)
	return out
}

// selectorUse is a metric a query selects, with the labels it filters or groups on.
type selectorUse struct {
	metric string
	equals map[string]string // label="value" filters
	labels []string          // every label named: filters and by/without clauses
}

// grafanaVars stands in for Grafana's range variables, which are no PromQL.
var grafanaVars = strings.NewReplacer("$__rate_interval", "5m", "$__interval", "1m", "$__range", "6h")

// queryUses parses a PromQL query (with MetricsQL's parser, a PromQL superset) and lists
// the metrics it selects and the labels it names for each.
func queryUses(expr string) ([]selectorUse, error) {
	e, err := metricsql.Parse(grafanaVars.Replace(expr))
	if err != nil {
		return nil, err
	}
	var uses []selectorUse
	var visit func(x metricsql.Expr, grouping []string)
	visit = func(x metricsql.Expr, grouping []string) {
		switch x := x.(type) {
		case *metricsql.MetricExpr:
			for _, lfs := range x.LabelFilterss {
				u := selectorUse{equals: map[string]string{}, labels: slices.Clone(grouping)}
				for _, lf := range lfs {
					if lf.Label == "__name__" {
						u.metric = lf.Value
						continue
					}
					u.labels = append(u.labels, lf.Label)
					if !lf.IsRegexp && !lf.IsNegative {
						u.equals[lf.Label] = lf.Value
					}
				}
				uses = append(uses, u)
			}
		case *metricsql.AggrFuncExpr:
			g := slices.Clone(grouping)
			g = append(g, x.Modifier.Args...)
			for _, a := range x.Args {
				visit(a, g)
			}
		case *metricsql.FuncExpr:
			for _, a := range x.Args {
				visit(a, grouping)
			}
		case *metricsql.RollupExpr:
			visit(x.Expr, grouping)
		case *metricsql.BinaryOpExpr:
			visit(x.Left, grouping)
			visit(x.Right, grouping)
		}
	}
	visit(e, nil)
	return uses, nil
}

// scrape fetches and parses a /metrics page.
func scrape(t *testing.T, base string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("%s/metrics: %v", base, err)
	}
	return fams
}

// family finds the family a series name belongs to: itself, or a histogram's or
// summary's _bucket, _count and _sum series. extra is the label the suffix adds (le).
func family(fams map[string]*dto.MetricFamily, name string) (f *dto.MetricFamily, extra string) {
	if f := fams[name]; f != nil {
		if f.GetType() == dto.MetricType_HISTOGRAM {
			return nil, "" // a classic histogram's series are its _bucket, _count and _sum
		}
		if f.GetType() == dto.MetricType_SUMMARY {
			return f, "quantile"
		}
		return f, ""
	}
	for suffix, label := range map[string]string{"_bucket": "le", "_count": "", "_sum": ""} {
		base, ok := strings.CutSuffix(name, suffix)
		if f := fams[base]; ok && f != nil && (f.GetType() == dto.MetricType_HISTOGRAM || (f.GetType() == dto.MetricType_SUMMARY && suffix != "_bucket")) {
			return f, label
		}
	}
	return nil, ""
}

// checkUse reports what in u the exported families do not have.
func checkUse(fams map[string]*dto.MetricFamily, u selectorUse) error {
	f, extra := family(fams, u.metric)
	if f == nil {
		return fmt.Errorf("metric %s is not exported", u.metric)
	}
	have := map[string]map[string]bool{}
	if extra != "" {
		have[extra] = map[string]bool{}
	}
	for _, m := range f.GetMetric() {
		for _, lp := range m.GetLabel() {
			if have[lp.GetName()] == nil {
				have[lp.GetName()] = map[string]bool{}
			}
			have[lp.GetName()][lp.GetValue()] = true
		}
	}
	for _, l := range u.labels {
		if have[l] == nil {
			return fmt.Errorf("metric %s has no label %q (it has %v)", u.metric, l, slices.Sorted(maps.Keys(have)))
		}
	}
	for l, v := range u.equals {
		if l != extra && !have[l][v] {
			return fmt.Errorf("metric %s has no series with %s=%q (seen %v)", u.metric, l, v, slices.Sorted(maps.Keys(have[l])))
		}
	}
	return nil
}

// pullThrough fetches img's manifest and blobs through a mirror URL, as containerd does.
func pullThrough(t *testing.T, mirror, origin string, img peers.Image) {
	t.Helper()
	q := "?ns=" + url.QueryEscape(origin)
	get := func(path, accept string) {
		req, err := http.NewRequest(http.MethodGet, mirror+path+q, nil)
		if err != nil {
			t.Fatal(err)
		}
		if accept != "" {
			req.Header.Set("Accept", accept)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if _, err := io.Copy(io.Discard, resp.Body); err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %d %v", path, resp.StatusCode, err)
		}
	}
	get("/v2/team/app/manifests/"+img.Digest, "application/vnd.oci.image.manifest.v1+json")
	for _, d := range append([]string{img.Config}, img.Layers...) {
		get("/v2/team/app/blobs/"+d, "")
	}
}
