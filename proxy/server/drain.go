package server

import (
	"fmt"
	"net/http"
	"time"
)

// drainState is why and since when the server is draining.
type drainState struct {
	reason string
	since  time.Time
}

// Drain marks the server as going away: from now on /readyz answers 503 naming reason,
// so Kubernetes takes the replica out of its Service (and out of the EndpointSlices the
// replicas find each other by) while everything else, requests in flight and new ones
// alike, is still served. It cannot be undone; the first call wins.
//
// A replica of several also stops owning new fills: the misses it owned go to the next
// member, so fills run on replicas that stay (AnnounceLeaving tells the others).
func (s *Server) Drain(reason string) {
	if s.draining.CompareAndSwap(nil, &drainState{reason: reason, since: time.Now()}) && s.peers != nil {
		s.peers.ring.MarkLeaving(s.peers.self, time.Time{})
	}
}

// Draining reports whether Drain was called.
func (s *Server) Draining() bool { return s.draining.Load() != nil }

// serveDraining answers /readyz with 503 when draining, and reports whether it did.
func (s *Server) serveDraining(w http.ResponseWriter) bool {
	d := s.draining.Load()
	if d == nil {
		return false
	}
	http.Error(w, fmt.Sprintf("draining: %s since %s", d.reason, d.since.UTC().Format(time.RFC3339)),
		http.StatusServiceUnavailable)
	return true
}
