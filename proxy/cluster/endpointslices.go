package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	discoveryinformers "k8s.io/client-go/informers/discovery/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// EndpointSliceMembers is the membership of a Kubernetes Service's ready endpoints, kept
// current by an informer on the Service's EndpointSlices (--peers-from-endpointslices).
// It needs get, list and watch on endpointslices.discovery.k8s.io in the namespace, and
// nothing else.
type EndpointSliceMembers struct {
	client             kubernetes.Interface
	namespace, service string
	cfg                endpointSliceConfig

	mu      sync.Mutex
	members []string
	changed chan struct{}
	running bool
	synced  chan struct{}
}

var _ Membership = (*EndpointSliceMembers)(nil)

// EndpointSliceOption configures EndpointSlices.
type EndpointSliceOption func(*endpointSliceConfig)

type endpointSliceConfig struct {
	portName    string
	scheme      string
	syncTimeout time.Duration
	log         *slog.Logger
}

// WithPortName picks the Service port members are reached at, by its name in the
// Service (and so in its EndpointSlices). The default is the empty name, which is
// what a Service with a single unnamed port has.
func WithPortName(name string) EndpointSliceOption {
	return func(c *endpointSliceConfig) { c.portName = name }
}

// WithScheme is the scheme of member URLs: "http" (the default) or "https".
func WithScheme(scheme string) EndpointSliceOption {
	return func(c *endpointSliceConfig) { c.scheme = scheme }
}

// WithSyncTimeout bounds how long Run waits for the first complete list of the
// EndpointSlices before it gives up with an error (default one minute): a replica
// that cannot learn its peers should say so, not wait silently.
func WithSyncTimeout(d time.Duration) EndpointSliceOption {
	return func(c *endpointSliceConfig) { c.syncTimeout = d }
}

// WithLogger sets where membership changes and API errors are logged.
func WithLogger(l *slog.Logger) EndpointSliceOption {
	return func(c *endpointSliceConfig) { c.log = l }
}

// EndpointSlices returns the membership of service's ready endpoints in namespace.
// Nothing is read until Run; Members is empty until then. Bad arguments are an
// invalid-argument error.
func EndpointSlices(client kubernetes.Interface, namespace, service string, opts ...EndpointSliceOption) (*EndpointSliceMembers, error) {
	cfg := endpointSliceConfig{scheme: "http", syncTimeout: time.Minute, log: slog.Default()}
	for _, o := range opts {
		o(&cfg)
	}
	invalid := func(format string, a ...any) error {
		return fmt.Errorf("cluster: endpointslice membership: "+format+": %w", append(a, errdefs.ErrInvalidArgument)...)
	}
	switch {
	case client == nil:
		return nil, invalid("no Kubernetes client")
	case cfg.scheme != "http" && cfg.scheme != "https":
		return nil, invalid("scheme %q: want http or https", cfg.scheme)
	case cfg.syncTimeout <= 0:
		return nil, invalid("sync timeout %v: must be positive", cfg.syncTimeout)
	}
	if errs := validation.IsDNS1123Label(namespace); len(errs) > 0 {
		return nil, invalid("namespace %q: %s", namespace, errs[0])
	}
	// The label kubernetes.io/service-name holds the Service's name, a DNS-1035 label.
	if errs := validation.IsDNS1035Label(service); len(errs) > 0 {
		return nil, invalid("service %q: %s", service, errs[0])
	}
	if cfg.portName != "" {
		if errs := validation.IsValidPortName(cfg.portName); len(errs) > 0 {
			return nil, invalid("port name %q: %s", cfg.portName, errs[0])
		}
	}
	return &EndpointSliceMembers{
		client: client, namespace: namespace, service: service, cfg: cfg,
		changed: make(chan struct{}), synced: make(chan struct{}),
	}, nil
}

// Members returns the current members, sorted and without duplicates.
func (m *EndpointSliceMembers) Members() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.members)
}

// Changed returns a channel closed at the next change of Members.
func (m *EndpointSliceMembers) Changed() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}

// Synced is closed once Run has read the complete list of the Service's EndpointSlices:
// from then on Members is the Service's view, not the empty start.
func (m *EndpointSliceMembers) Synced() <-chan struct{} { return m.synced }

// Run watches the Service's EndpointSlices until ctx ends, then returns nil. It fails
// early when the first complete list cannot be read: a permission-denied error when
// the API server refuses (the credentials may not list EndpointSlices in the
// namespace), an unauthenticated one when it does not know them, and an unavailable
// one, with the last error seen (or a plain list's), after the sync timeout. Once synced it keeps
// going through API errors (the informer retries; Members keeps the last view). Run
// may be called once.
func (m *EndpointSliceMembers) Run(ctx context.Context) error {
	m.mu.Lock()
	if m.running {
		m.mu.Unlock()
		return fmt.Errorf("cluster: endpointslice membership of %s: Run called twice: %w", m.name(), errdefs.ErrFailedPrecondition)
	}
	m.running = true
	m.mu.Unlock()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	selector := discoveryv1.LabelServiceName + "=" + m.service
	informer := discoveryinformers.NewFilteredEndpointSliceInformer(m.client, m.namespace, 0,
		cache.Indexers{}, func(o *metav1.ListOptions) { o.LabelSelector = selector })

	// lastErr is the informer's last reported error; refused, a refusal before the
	// first list, which ends Run.
	var lastErr, refused errorBox
	if err := informer.SetWatchErrorHandlerWithContext(func(hctx context.Context, r *cache.Reflector, err error) {
		lastErr.set(err)
		if !isSynced(m.synced) {
			switch {
			case apierrors.IsForbidden(err):
				refused.set(fmt.Errorf("cluster: endpointslice membership of %s: the API server refused to list EndpointSlices (grant get, list and watch on endpointslices.discovery.k8s.io in namespace %s): %w: %v",
					m.name(), m.namespace, errdefs.ErrPermissionDenied, err))
				cancel()
				return
			case apierrors.IsUnauthorized(err):
				refused.set(fmt.Errorf("cluster: endpointslice membership of %s: the API server did not accept the credentials: %w: %v",
					m.name(), errdefs.ErrUnauthenticated, err))
				cancel()
				return
			}
		}
		m.cfg.log.Warn("endpointslice watch failed; retrying", "service", m.name(), "error", err)
		cache.DefaultWatchErrorHandler(hctx, r, err)
	}); err != nil {
		return fmt.Errorf("cluster: endpointslice membership of %s: %w", m.name(), err)
	}
	// Events of the first list arrive one slice at a time: members are only taken from
	// the store once it is complete (live), so Changed does not fire for partial views.
	var live atomic.Bool
	recompute := func() { m.set(m.membersIn(informer.GetStore().List())) }
	onEvent := func() {
		if live.Load() {
			recompute()
		}
	}
	if _, err := informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { onEvent() },
		UpdateFunc: func(any, any) { onEvent() },
		DeleteFunc: func(any) { onEvent() },
	}); err != nil {
		return fmt.Errorf("cluster: endpointslice membership of %s: %w", m.name(), err)
	}

	done := make(chan struct{})
	go func() {
		defer close(done)
		informer.RunWithContext(ctx)
	}()
	defer func() { cancel(); <-done }()

	syncCtx, stopSync := context.WithTimeout(ctx, m.cfg.syncTimeout)
	ok := cache.WaitForCacheSync(syncCtx.Done(), informer.HasSynced)
	stopSync()
	if !ok {
		if err := refused.get(); err != nil {
			return err
		}
		if ctx.Err() != nil {
			return fmt.Errorf("cluster: endpointslice membership of %s: stopped before the first list: %w", m.name(), ctx.Err())
		}
		return fmt.Errorf("cluster: endpointslice membership of %s: no complete list of EndpointSlices within %v (%v): %w",
			m.name(), m.cfg.syncTimeout, m.whyNotSynced(lastErr.get()), errdefs.ErrUnavailable)
	}
	// live first: an event whose handler saw !live changed the store before this read.
	live.Store(true)
	recompute()
	close(m.synced)
	m.cfg.log.Info("endpointslice membership synced", "service", m.name(), "members", m.Members())
	<-ctx.Done()
	return nil
}

// whyNotSynced is the error to report when the first list did not complete in time.
// The informer retries some errors (connection refused, 429) inside without reporting
// them, so when it reported none, one plain list shows what the API server answers.
func (m *EndpointSliceMembers) whyNotSynced(reported error) error {
	if reported != nil {
		return fmt.Errorf("last error: %w", reported)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := m.client.DiscoveryV1().EndpointSlices(m.namespace).List(ctx, metav1.ListOptions{
		LabelSelector: discoveryv1.LabelServiceName + "=" + m.service, Limit: 1,
	})
	if err != nil {
		return fmt.Errorf("a list now fails: %w", err)
	}
	return errors.New("a list now succeeds; the API server was slow")
}

func (m *EndpointSliceMembers) name() string { return m.namespace + "/" + m.service }

// membersIn is the membership the informer's store holds now.
func (m *EndpointSliceMembers) membersIn(objs []any) []string {
	eps := make([]*discoveryv1.EndpointSlice, 0, len(objs))
	for _, o := range objs {
		if s, ok := o.(*discoveryv1.EndpointSlice); ok {
			eps = append(eps, s)
		}
	}
	return membersOf(eps, m.cfg.scheme, m.cfg.portName)
}

// set replaces the members and closes the Changed channel when they differ.
func (m *EndpointSliceMembers) set(members []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if slices.Equal(members, m.members) {
		return
	}
	m.members = members
	close(m.changed)
	m.changed = make(chan struct{})
	m.cfg.log.Info("membership changed", "service", m.name(), "members", members)
}

func isSynced(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// errorBox holds the last error the informer reported, for the sync timeout's message.
type errorBox struct {
	mu  sync.Mutex
	err error
}

func (b *errorBox) set(err error) { b.mu.Lock(); b.err = err; b.mu.Unlock() }
func (b *errorBox) get() error    { b.mu.Lock(); defer b.mu.Unlock(); return b.err }
