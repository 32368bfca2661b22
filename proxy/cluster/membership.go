// Package cluster is what cove-cache replicas share: who the live replicas are
// (membership), which of them owns a digest (rendezvous hashing), and the authenticated
// replica-to-replica path a miss takes to its owner.
package cluster

import "context"

// Membership tells a replica the current set of replicas, itself included. Each member
// is the base URL other replicas reach it at (scheme://host:port, no path), as given by
// --peer / --advertise-url or read from the Service's EndpointSlices.
type Membership interface {
	// Members returns the current members, sorted, without duplicates. It never blocks.
	Members() []string
	// Changed returns a channel that is closed at the next change of Members (a new
	// channel is returned after each change).
	Changed() <-chan struct{}
	// Run keeps the membership current until ctx ends (a no-op for a static list).
	Run(ctx context.Context) error
}
