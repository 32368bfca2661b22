package fill

// JoinRunning joins the fill of key in flight, for a caller that will read from byte
// from, and never starts one: it returns nil when none is in flight or the one in flight
// cannot serve from (a pass-through fill whose window is past it). It is how a replica
// that is leaving serves its fills to the replicas taking over (join-only requests):
// a second origin fetch is what the caller avoids, so it must not start one. fetch is
// the caller's way to ask the origin, kept like a joiner's (handover.go). The caller
// must Release the fill.
func (m *Manager) JoinRunning(key Key, owner string, from int64, fetch FetchFunc) *Fill {
	m.mu.Lock()
	defer m.mu.Unlock()
	f := m.fills[key]
	if f == nil || !f.serves(from) {
		return nil
	}
	f.refs++
	f.hold(from)
	f.addFetcher(owner, fetch)
	return f
}
