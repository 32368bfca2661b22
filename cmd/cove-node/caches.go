package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/cove-oci/cove/plugin/nodeinstall"
	"github.com/cove-oci/cove/proxy/cluster"
)

// In Kubernetes a node sees the cove-cache Service, not its pods: one --cache URL (the
// Service) sends each request to any replica, and most blob misses then take a second
// hop to their owner. With --caches-from-endpointslices, cove-node reads the replicas
// from the Service's EndpointSlices, as the replicas do (cluster.EndpointSlices), and
// sends each blob to its owner (plugin/mirror caches.go).

// sliceOptions are the flags of the EndpointSlice membership.
type sliceOptions struct {
	service    string // NAMESPACE/SERVICE
	portName   string
	kubeconfig string
}

func (s *sliceOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&s.service, "caches-from-endpointslices", "", "the cove-cache replicas are the ready endpoints of this Kubernetes Service, `NAMESPACE/SERVICE`, watched through its EndpointSlices (needs get, list and watch on endpointslices in NAMESPACE): each blob goes to the replica that owns it; the --cache URLs are used while none is known")
	fs.StringVar(&s.portName, "caches-port-name", "http", "with --caches-from-endpointslices: the `NAME` of the Service port cove-cache serves on")
	fs.StringVar(&s.kubeconfig, "kubeconfig", "", "with --caches-from-endpointslices: a kubeconfig `FILE` (default: the pod's in-cluster ServiceAccount)")
}

// check validates the flags.
func (s *sliceOptions) check() error {
	if s.service == "" {
		if s.kubeconfig != "" {
			return errors.New("--kubeconfig needs --caches-from-endpointslices")
		}
		return nil
	}
	return nodeinstall.CheckCachesFrom(s.service, s.portName)
}

// membership builds the EndpointSlice membership (nil without the flag). Member URLs are
// https when every --cache URL is (the replicas then serve TLS), else http.
func (s *sliceOptions) membership(caches []string, log *slog.Logger) (*sliceMembers, error) {
	if s.service == "" {
		return nil, nil
	}
	namespace, name, _ := strings.Cut(s.service, "/")
	client, err := cluster.KubeClient(s.kubeconfig, "cove-node")
	if err != nil {
		return nil, fmt.Errorf("--caches-from-endpointslices: Kubernetes API configuration: %w", err)
	}
	scheme := "http"
	if len(caches) > 0 {
		scheme = "https"
		for _, c := range caches {
			if !strings.HasPrefix(strings.ToLower(c), "https://") {
				scheme = "http"
			}
		}
	}
	build := func() (*cluster.EndpointSliceMembers, error) {
		return cluster.EndpointSlices(client, namespace, name,
			cluster.WithPortName(s.portName), cluster.WithScheme(scheme), cluster.WithLogger(log))
	}
	first, err := build()
	if err != nil {
		return nil, fmt.Errorf("--caches-from-endpointslices: %w", err)
	}
	return &sliceMembers{next: first, build: build, log: log, changed: make(chan struct{}),
		minRetry: 2 * time.Second, maxRetry: time.Minute}, nil
}

// sliceMembers is a cluster.Membership that keeps an EndpointSlice watcher running.
// cluster.EndpointSliceMembers gives up when its first list fails (the API server
// unreachable for its sync timeout, or refusing the credentials) and runs once; a node
// must not lose its replicas for good over an API server that was down when it started,
// so a watcher that gave up is replaced by a new one after a back-off. Meanwhile the
// members are empty, and requests go to the --cache URLs.
type sliceMembers struct {
	build              func() (*cluster.EndpointSliceMembers, error)
	log                *slog.Logger
	minRetry, maxRetry time.Duration

	mu      sync.Mutex
	next    *cluster.EndpointSliceMembers // built, not run yet
	cur     *cluster.EndpointSliceMembers // running
	changed chan struct{}
}

var _ cluster.Membership = (*sliceMembers)(nil)

func (s *sliceMembers) Members() []string {
	s.mu.Lock()
	cur := s.cur
	s.mu.Unlock()
	if cur == nil {
		return nil
	}
	return cur.Members()
}

func (s *sliceMembers) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

func (s *sliceMembers) notify() {
	s.mu.Lock()
	defer s.mu.Unlock()
	close(s.changed)
	s.changed = make(chan struct{})
}

// Run keeps a watcher running until ctx ends, then returns nil.
func (s *sliceMembers) Run(ctx context.Context) error {
	retry := s.minRetry
	for {
		s.mu.Lock()
		m := s.next
		s.next = nil
		s.mu.Unlock()
		if m == nil {
			var err error
			if m, err = s.build(); err != nil {
				return err // the same arguments built the first one: not expected
			}
		}
		s.mu.Lock()
		s.cur = m
		s.mu.Unlock()
		done := make(chan struct{})
		go func() { // pass the watcher's changes on
			for {
				ch := m.Changed()
				s.notify()
				select {
				case <-ch:
				case <-done:
					return
				}
			}
		}()
		err := m.Run(ctx)
		close(done)
		s.mu.Lock()
		s.cur = nil
		s.mu.Unlock()
		s.notify()
		if ctx.Err() != nil {
			return nil
		}
		s.log.Error("cove-cache replicas unknown: requests go to the --cache URLs; watching the EndpointSlices again after a pause",
			"retry_in", retry, "error", err)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(retry):
		}
		retry = min(retry*2, s.maxRetry)
	}
}
