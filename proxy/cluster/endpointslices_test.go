package cluster

import (
	"context"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"

	"github.com/cove-oci/cove/internal/peers"
)

// endpointSliceReader is the whole grant EndpointSlice membership needs.
var endpointSliceReader = rbacv1.PolicyRule{
	APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"},
}

// serviceSlice is an EndpointSlice of service with the peer and http ports.
func serviceSlice(namespace, name, service string, eps ...discoveryv1.Endpoint) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, Labels: map[string]string{
			discoveryv1.LabelServiceName: service, discoveryv1.LabelManagedBy: "cove-test",
		}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{port("peer", 5006), port("http", 5005)},
		Endpoints:   eps,
	}
}

func clientFor(t *testing.T, cfg *rest.Config) kubernetes.Interface {
	t.Helper()
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// runMembership runs m until the test ends and returns Run's result channel.
func runMembership(t *testing.T, m *EndpointSliceMembers) <-chan error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("Run did not return after its context ended")
		}
	})
	return done
}

// awaitChange waits for changed to close, then for Members to equal want.
func awaitChange(t *testing.T, m *EndpointSliceMembers, changed <-chan struct{}, want ...string) {
	t.Helper()
	select {
	case <-changed:
	case <-time.After(30 * time.Second):
		t.Fatalf("Changed did not fire; members %q, want %q", m.Members(), want)
	}
	deadline := time.After(30 * time.Second)
	for {
		next := m.Changed()
		got := m.Members()
		if slices.Equal(got, want) || len(got) == 0 && len(want) == 0 {
			return
		}
		select {
		case <-next:
		case <-deadline:
			t.Fatalf("members %q, want %q", got, want)
		}
	}
}

func TestEndpointSlicesFollowReadyEndpoints(t *testing.T) {
	k := peers.StartKubeAPIServer(t)
	admin := k.AdminClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// The replicas' ServiceAccount, bound only to reading EndpointSlices in its namespace.
	cfg := k.ServiceAccountConfig(t, "cove", "cove-cache")
	k.GrantRole(t, "cove", "cove-cache", "cove-cache-peers", endpointSliceReader)
	k.EnsureNamespace(t, "elsewhere")
	slicesIn := func(ns string) interface {
		Create(context.Context, *discoveryv1.EndpointSlice, metav1.CreateOptions) (*discoveryv1.EndpointSlice, error)
		Update(context.Context, *discoveryv1.EndpointSlice, metav1.UpdateOptions) (*discoveryv1.EndpointSlice, error)
		Delete(context.Context, string, metav1.DeleteOptions) error
	} {
		return admin.DiscoveryV1().EndpointSlices(ns)
	}
	create := func(s *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
		t.Helper()
		got, err := slicesIn(s.Namespace).Create(ctx, s, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create EndpointSlice %s/%s: %v", s.Namespace, s.Name, err)
		}
		return got
	}
	yes, no := ptr.To(true), ptr.To(false)
	a := create(serviceSlice("cove", "cove-a", "cove", endpoint("10.0.0.1", yes, no), endpoint("10.0.0.2", yes, no)))
	// Neither another Service's slice nor the same Service name in another namespace counts.
	create(serviceSlice("cove", "other-a", "other", endpoint("10.0.9.1", yes, no)))
	create(serviceSlice("elsewhere", "cove-a", "cove", endpoint("10.0.9.2", yes, no)))

	m, err := EndpointSlices(clientFor(t, cfg), "cove", "cove", WithPortName("peer"), WithScheme("http"))
	if err != nil {
		t.Fatal(err)
	}
	first := m.Changed()
	runMembership(t, m)
	select {
	case <-m.Synced():
	case <-time.After(time.Minute):
		t.Fatal("the membership did not sync")
	}
	awaitChange(t, m, first, "http://10.0.0.1:5006", "http://10.0.0.2:5006")

	// A replica joins in a second slice.
	changed := m.Changed()
	b := create(serviceSlice("cove", "cove-b", "cove", endpoint("10.0.0.3", nil, nil)))
	awaitChange(t, m, changed, "http://10.0.0.1:5006", "http://10.0.0.2:5006", "http://10.0.0.3:5006")

	// One turns not ready.
	changed = m.Changed()
	a.Endpoints[1].Conditions.Ready = no
	if a, err = slicesIn("cove").Update(ctx, a, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	awaitChange(t, m, changed, "http://10.0.0.1:5006", "http://10.0.0.3:5006")

	// One terminates while it still reports ready (a Service publishing not-ready
	// addresses looks like this during a rolling update).
	changed = m.Changed()
	a.Endpoints[0].Conditions.Terminating = yes
	if _, err = slicesIn("cove").Update(ctx, a, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	awaitChange(t, m, changed, "http://10.0.0.3:5006")

	// A slice goes away with its replica.
	changed = m.Changed()
	if err := slicesIn("cove").Delete(ctx, b.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	awaitChange(t, m, changed)

	// Slices of another Service, or of this Service's name in another namespace, never
	// become members: they are written before ours, and events come in the order of
	// writes, so a view that took them in would show them before 10.0.0.4 and never
	// equal the wanted list.
	changed = m.Changed()
	create(serviceSlice("cove", "other-b", "other", endpoint("10.0.9.3", yes, no)))
	create(serviceSlice("elsewhere", "cove-b", "cove", endpoint("10.0.9.4", yes, no)))
	create(serviceSlice("cove", "cove-c", "cove", endpoint("10.0.0.4", yes, no)))
	awaitChange(t, m, changed, "http://10.0.0.4:5006")
}

// A ServiceAccount without the grant gets a clear error from Run, at once rather than
// after the sync timeout, and one with an unknown token an unauthenticated one.
func TestEndpointSlicesRefusedWithoutTheGrant(t *testing.T) {
	k := peers.StartKubeAPIServer(t)
	cfg := k.ServiceAccountConfig(t, "cove", "no-grant")
	// A grant elsewhere is no grant here.
	k.EnsureNamespace(t, "elsewhere")
	k.ServiceAccountConfig(t, "elsewhere", "no-grant")
	k.GrantRole(t, "elsewhere", "no-grant", "peers", endpointSliceReader)
	for _, c := range []struct {
		name   string
		cfg    *rest.Config
		is     func(error) bool
		phrase string
	}{
		{"no grant", cfg, errdefs.IsPermissionDenied, "grant get, list and watch on endpointslices.discovery.k8s.io in namespace cove"},
		{"unknown token", k.Config("not-a-token"), errdefs.IsUnauthorized, "did not accept the credentials"},
	} {
		t.Run(c.name, func(t *testing.T) {
			m, err := EndpointSlices(clientFor(t, c.cfg), "cove", "cove", WithSyncTimeout(2*time.Minute))
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			start := time.Now()
			err = m.Run(ctx)
			if err == nil || !c.is(err) || !strings.Contains(err.Error(), c.phrase) {
				t.Fatalf("Run = %v, want an error saying %q", err, c.phrase)
			}
			if time.Since(start) > time.Minute {
				t.Fatalf("Run took %v to fail: it waited instead of reporting the refusal", time.Since(start))
			}
			if got := m.Members(); len(got) != 0 {
				t.Fatalf("a refused membership has members %q", got)
			}
		})
	}
}

// With no API server to answer, Run gives up after the sync timeout with the last error.
func TestEndpointSlicesUnavailable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now
	client := clientFor(t, &rest.Config{Host: "https://" + addr, BearerToken: "x", TLSClientConfig: rest.TLSClientConfig{Insecure: true}})
	m, err := EndpointSlices(client, "cove", "cove", WithSyncTimeout(3*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	err = m.Run(context.Background())
	if !errdefs.IsUnavailable(err) || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("Run = %v, want unavailable with the connection error", err)
	}
	// Run is once only.
	if err := m.Run(context.Background()); !errdefs.IsFailedPrecondition(err) {
		t.Fatalf("second Run = %v, want a failed-precondition error", err)
	}
}

func TestEndpointSlicesRejectsBadArguments(t *testing.T) {
	client := clientFor(t, &rest.Config{Host: "https://127.0.0.1:1"})
	for _, c := range []struct {
		client             kubernetes.Interface
		namespace, service string
		opts               []EndpointSliceOption
	}{
		{nil, "cove", "cove", nil},
		{client, "", "cove", nil},
		{client, "Cove", "cove", nil},
		{client, "cove", "", nil},
		{client, "cove", "cove,app=x", nil},
		{client, "cove", "cove", []EndpointSliceOption{WithScheme("ftp")}},
		{client, "cove", "cove", []EndpointSliceOption{WithPortName("no spaces")}},
		{client, "cove", "cove", []EndpointSliceOption{WithSyncTimeout(0)}},
	} {
		m, err := EndpointSlices(c.client, c.namespace, c.service, c.opts...)
		if !errdefs.IsInvalidArgument(err) || m != nil {
			t.Errorf("EndpointSlices(%q, %q) = %v, %v; want an invalid-argument error", c.namespace, c.service, m, err)
		}
	}
	if _, err := EndpointSlices(client, "cove", "cove", WithPortName("peer"), WithScheme("https")); err != nil {
		t.Fatalf("good arguments refused: %v", err)
	}
}
