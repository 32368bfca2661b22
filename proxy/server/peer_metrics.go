package server

import (
	"github.com/prometheus/client_golang/prometheus"
)

// peerMetrics are the peer path's collectors.
type peerMetrics struct {
	requests  *prometheus.CounterVec // peer requests received, by result
	forwarded *prometheus.CounterVec // peer fill fetches, by where they went
	ownerDown prometheus.Counter
	resumes   *prometheus.CounterVec
}

func newPeerMetrics(reg prometheus.Registerer, members func() []string) (*peerMetrics, error) {
	m := &peerMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_peer_requests_total",
			Help: "Requests received with peer authentication, by result: accepted, or rejected (refused with 403).",
		}, []string{"result"}),
		forwarded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_peer_forwarded_total",
			Help: "Fetches of blob misses this replica does not own, by where they went: owner (another replica), or origin (every owner ranked above this replica was down).",
		}, []string{"to"}),
		ownerDown: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cove_peer_owner_down_total",
			Help: "Times an owner replica was found unreachable (connect failure, timeout, stream cut) and routed around.",
		}),
		resumes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_peer_resumes_total",
			Help: "Resumes of a peer stream cut short, by result: ranged (the next owner sent the rest), restarted, failed.",
		}, []string{"result"}),
	}
	// Read at every scrape: a replica that sees fewer members than the Deployment has
	// replicas (EndpointSlices not readable, peers not ready) fetches blobs others own.
	membersSeen := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cove_peer_members",
		Help: "Replicas this replica currently sees as members (itself included when listed), from --peer or the Service's ready EndpointSlices.",
	}, func() float64 { return float64(len(members())) })
	for _, c := range []prometheus.Collector{m.requests, m.forwarded, m.ownerDown, m.resumes, membersSeen} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	m.requests.WithLabelValues("accepted")
	m.requests.WithLabelValues("rejected")
	return m, nil
}

func (m *peerMetrics) resumed(result string) { m.resumes.WithLabelValues(result).Inc() }
