// Package metrics defines cove-cache's Prometheus metrics.
//
// Egress saved per registry is bytes_sent_total{source="cache"} minus nothing: every byte
// sent from the cache is a byte the origin did not send. Hit ratio is
// requests_total{result="hit"} over all blob and manifest requests.
package metrics

import (
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Results of a request, the values of the result label.
const (
	ResultHit         = "hit"         // served from storage
	ResultMiss        = "miss"        // started an origin fill
	ResultCoalesced   = "coalesced"   // joined a fill another request started
	ResultDenied      = "denied"      // the origin refused this client
	ResultError       = "error"       // origin unreachable or failed, or a cove fault
	ResultPassthrough = "passthrough" // relayed without caching (tags, HEAD misses)
	ResultInvalid     = "invalid"     // refused as malformed
	ResultStale       = "stale"       // served by the offline policy, the origin unreachable
)

// Metrics holds the collectors.
type Metrics struct {
	Registry *prometheus.Registry

	Requests       *prometheus.CounterVec
	BytesSent      *prometheus.CounterVec
	OriginBytes    *prometheus.CounterVec
	OriginRequests *prometheus.CounterVec
	OriginRefused  *prometheus.CounterVec
	FillDuration   *prometheus.HistogramVec
	FillsInFlight  prometheus.GaugeFunc
	AuthzChecks    prometheus.Counter
	StoreErrors    *prometheus.CounterVec
	PassedThrough  *prometheus.CounterVec
	ReadersCut     prometheus.Counter
	FillResumes    *prometheus.CounterVec
	StoreDegraded  prometheus.Gauge

	labels *labelLimiter
}

// New creates and registers the collectors. inFlight reports the running fills.
func New(inFlight func() int) *Metrics {
	reg := prometheus.NewRegistry()
	m := &Metrics{
		Registry: reg,
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_requests_total",
			Help: "Distribution API and token requests by operation (manifest, blob, tags, referrers, ping, token) and result (hit, miss, coalesced, denied, error, passthrough, invalid).",
		}, []string{"operation", "result"}),
		BytesSent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_bytes_sent_total",
			Help: "Blob and manifest bytes sent to clients, by registry and source (cache: from storage, an origin fetch avoided; fill: streamed from an origin fetch).",
		}, []string{"registry", "source"}),
		OriginBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_origin_bytes_total",
			Help: "Bytes fetched from origin registries into the cache, by registry.",
		}, []string{"registry"}),
		OriginRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_origin_requests_total",
			Help: "Requests sent to origin registries, by registry and status code (error: no answer).",
		}, []string{"registry", "status"}),
		OriginRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_origin_refused_total",
			Help: "Origin requests the origin policy refused before any byte was sent, by reason (denied, self, loopback, private, link-local, metadata, unspecified, multicast, reserved).",
		}, []string{"reason"}),
		FillDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "cove_fill_duration_seconds",
			Help:    "Duration of origin fills, by result (ok, failed, refused).",
			Buckets: prometheus.ExponentialBuckets(0.01, 3, 12),
		}, []string{"result"}),
		labels: &labelLimiter{max: 200, seen: map[string]bool{}},
	}
	m.AuthzChecks = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "cove_authz_checks_total",
		Help: "Authorization checks sent to origins for cached objects (a HEAD with the client's credentials), when no fresh allowance and membership answered.",
	})
	reg.MustRegister(m.AuthzChecks)
	m.StoreErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cove_fill_store_errors_total",
		Help: "Store failures while filling, by operation (create or write of a spool file, commit of a verified blob) and reason (no_space, quota, io_error, read_only, permission, too_large, other).",
	}, []string{"operation", "reason"})
	m.PassedThrough = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cove_fills_passed_through_total",
		Help: "Fills streamed to their clients but not stored, by reason (a store error's reason, or reserve_refused).",
	}, []string{"reason"})
	m.ReadersCut = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "cove_passthrough_readers_cut_total",
		Help: "Client responses cut off because they fell behind a pass-through fill's window (the client resumes with a Range request).",
	})
	m.StoreDegraded = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "cove_store_degraded",
		Help: "1 while the store cannot take blobs (fills pass through unstored), from the first failure until a blob is stored again.",
	})
	m.FillResumes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cove_fill_resumes_total",
		Help: "Origin bodies cut short (dropped connection, stall) and asked for again from the last byte, by result: ranged (a 206 continued the body), restarted (a 200 started it over before any client had a byte), failed (the fill gave up).",
	}, []string{"result"})
	reg.MustRegister(m.StoreErrors, m.PassedThrough, m.ReadersCut, m.StoreDegraded, m.FillResumes)
	m.FillsInFlight = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cove_fills_in_flight",
		Help: "Origin fills running now.",
	}, func() float64 { return float64(inFlight()) })
	reg.MustRegister(m.Requests, m.BytesSent, m.OriginBytes, m.OriginRequests, m.OriginRefused, m.FillDuration, m.FillsInFlight,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// RegistryLabel bounds the registry label's cardinality: registry names come from clients,
// so past a fixed number of distinct values the rest are counted as "other".
func (m *Metrics) RegistryLabel(registry string) string { return m.labels.label(registry) }

// AuthzCheck counts one authorization check at an origin.
func (m *Metrics) AuthzCheck() { m.AuthzChecks.Inc() }

// Request counts one request.
func (m *Metrics) Request(operation, result string) {
	m.Requests.WithLabelValues(operation, result).Inc()
}

// Sent counts bytes sent to a client.
func (m *Metrics) Sent(registry, source string, n int64) {
	if n > 0 {
		m.BytesSent.WithLabelValues(m.RegistryLabel(registry), source).Add(float64(n))
	}
}

// FromOrigin counts bytes read from an origin.
func (m *Metrics) FromOrigin(registry string, n int) {
	m.OriginBytes.WithLabelValues(m.RegistryLabel(registry)).Add(float64(n))
}

// OriginRequest counts one origin request.
func (m *Metrics) OriginRequest(registry string, status int, err error) {
	s := "error"
	if err == nil {
		s = strconv.Itoa(status)
	}
	m.OriginRequests.WithLabelValues(m.RegistryLabel(registry), s).Inc()
}

// OriginRefusal counts one origin request the policy refused. reason comes from the
// origin package's fixed set, so the label stays bounded.
func (m *Metrics) OriginRefusal(reason string) {
	m.OriginRefused.WithLabelValues(reason).Inc()
}

// StoreError counts one store failure; op and reason come from the fill package's fixed
// sets.
func (m *Metrics) StoreError(op, reason string) { m.StoreErrors.WithLabelValues(op, reason).Inc() }

// PassThrough counts one fill passed through unstored.
func (m *Metrics) PassThrough(reason string) { m.PassedThrough.WithLabelValues(reason).Inc() }

// FillResume counts one resume of an origin body, by result (see fill.Events.Resume).
func (m *Metrics) FillResume(result string) { m.FillResumes.WithLabelValues(result).Inc() }

// ReaderCut counts one client response cut off behind a pass-through window.
func (m *Metrics) ReaderCut() { m.ReadersCut.Inc() }

// StoreCondition sets cove_store_degraded.
func (m *Metrics) StoreCondition(degraded bool) {
	v := 0.0
	if degraded {
		v = 1
	}
	m.StoreDegraded.Set(v)
}

// Fill records a finished fill.
func (m *Metrics) Fill(result string, d time.Duration) {
	m.FillDuration.WithLabelValues(result).Observe(d.Seconds())
}

type labelLimiter struct {
	mu   sync.Mutex
	max  int
	seen map[string]bool
}

func (l *labelLimiter) label(v string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.seen[v] {
		return v
	}
	if len(l.seen) >= l.max {
		return "other"
	}
	l.seen[v] = true
	return v
}

// ResultForStatus is the metric result of relaying an origin's non-200 answer.
func ResultForStatus(status int) string {
	switch {
	case status == http.StatusUnauthorized || status == http.StatusForbidden || status == http.StatusNotFound:
		return ResultDenied
	case status >= 500:
		return ResultError
	}
	return ResultPassthrough
}
