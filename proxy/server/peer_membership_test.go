package server_test

import (
	"context"
	"net/http"
	"sync"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
)

// changingMembership is a membership the test changes (as EndpointSlices would).
type changingMembership struct {
	mu      sync.Mutex
	members []string
	changed chan struct{}
}

func (m *changingMembership) Members() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.members
}

func (m *changingMembership) Changed() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}

func (m *changingMembership) Run(context.Context) error { return nil }

func (m *changingMembership) set(members []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.members = members
	close(m.changed)
	m.changed = make(chan struct{})
}

// A replica that joins takes over the ownership of some digests; blobs already stored
// are hits on every replica, the new owner included: no second origin fetch.
func TestPeerMembershipChangeNoRefetch(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/join:v1", 8, 64<<10)
	var m *changingMembership
	rs := newReplicaSetOn(t, 3, origin.Addr, nil, func(urls []string) cluster.Membership {
		m = &changingMembership{members: urls[:2], changed: make(chan struct{})}
		return m
	})
	blobs := append([]string{img.Config}, img.Layers...)
	for _, d := range blobs {
		mustGet(t, rs.replicas[0].url(origin.Addr, "/v2/team/join/blobs/"+d), nil, http.StatusOK)
	}
	for _, c := range rs.replicas {
		c.settle(t)
	}
	before := origin.BlobGETs()
	changed := m.Changed()
	m.set(rs.urls)
	select {
	case <-changed:
	default:
		t.Fatal("Changed() was not closed by a change")
	}
	moved := 0
	for _, d := range blobs {
		if cluster.Owner(rs.urls, d) != cluster.Owner(rs.urls[:2], d) {
			moved++
		}
		for _, c := range rs.replicas {
			_, body := mustGet(t, c.url(origin.Addr, "/v2/team/join/blobs/"+d), nil, http.StatusOK)
			if sha(body) != d {
				t.Fatalf("wrong bytes for %s after the join", d)
			}
		}
	}
	t.Logf("the join moved the ownership of %d of %d blobs", moved, len(blobs))
	after := origin.BlobGETs()
	for _, d := range blobs {
		if after[d] != before[d] || before[d] != 1 {
			t.Errorf("origin GETs of %s: %d before the join, %d after, want 1 and 1", d, before[d], after[d])
		}
	}
}
