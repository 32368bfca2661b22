package cluster

import "time"

// A replica that drains (SIGTERM: a rolling update, a node drain) tells the others it is
// leaving. From then on it owns no new fill: every replica ranks the digest's members
// as before but skips the leaving one when it chooses where a new fill runs, so fills
// start on replicas that stay. The fills the leaving replica already runs are not lost
// either: a miss whose first live member in rank is a leaving replica is first offered
// to it (Route.Handoff), join-only, and streams from its fill when it has one. A leaving
// member is remembered until the time it announced (its drain's bound), even after the
// membership has dropped it (its EndpointSlice endpoint turns not ready at once), so the
// offer reaches it for as long as its fills can run.

// MaxLeaving bounds how long a member is taken as leaving, whatever it announced.
const MaxLeaving = 15 * time.Minute

// Route is where a miss of one key goes, from this replica's view.
type Route struct {
	// Owners are the candidate owners of a new fill, best first, as Ring.Owners.
	Owners []string
	// Handoff, when not empty, is a leaving member ranked above every owner (the first
	// member in rank that is not down): it may be filling the key already, and is asked
	// join-only before Owners[0] starts a fill of its own.
	Handoff string
}

// Route returns where a miss of key goes. See Route's fields.
func (r *Ring) Route(key string) Route {
	members := r.members.Members()
	all := make([]string, 0, len(members)+2)
	seen := make(map[string]bool, len(members)+1)
	for _, m := range members {
		if !seen[m] {
			seen[m] = true
			all = append(all, m)
		}
	}
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	for m, until := range r.leaving {
		if !until.IsZero() && !now.Before(until) {
			delete(r.leaving, m)
			continue
		}
		if !seen[m] { // dropped by the membership, still draining: it may hold a fill
			seen[m] = true
			all = append(all, m)
		}
	}
	if !seen[r.self] {
		all = append(all, r.self)
	}
	ranked := Rank(all, key)
	var route Route
	out := make([]string, 0, len(ranked))
	first := true // no member up has been seen yet in rank order
	_, selfLeaving := r.leaving[r.self]
	for _, m := range ranked {
		if m == r.self {
			if !selfLeaving {
				out = append(out, m)
				break
			}
			first = false
			continue
		}
		if until, ok := r.down[m]; ok {
			if now.Before(until) {
				continue
			}
			delete(r.down, m)
		}
		if _, ok := r.leaving[m]; ok {
			if first {
				route.Handoff = m
			}
			first = false
			continue
		}
		first = false
		out = append(out, m)
	}
	if selfLeaving {
		out = append(out, r.self) // the last resort: every other member is down or leaving
	}
	route.Owners = out
	return route
}

// MarkLeaving takes member as leaving until until (the zero time: for good, which is
// how a replica marks itself when it drains). until is capped at MaxLeaving from now.
func (r *Ring) MarkLeaving(member string, until time.Time) {
	now := r.now()
	if member != r.self && (until.IsZero() || until.After(now.Add(MaxLeaving))) {
		until = now.Add(MaxLeaving)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.leaving[member] = until
}

// MarkServing forgets that member was leaving: a replica that started again at the same
// URL said it serves.
func (r *Ring) MarkServing(member string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.leaving, member)
}

// Leaving returns the members taken as leaving now (self included when it drains).
func (r *Ring) Leaving() []string {
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for m, until := range r.leaving {
		if until.IsZero() || now.Before(until) {
			out = append(out, m)
		}
	}
	return out
}

// Members returns the membership's current members.
func (r *Ring) Members() []string { return r.members.Members() }
