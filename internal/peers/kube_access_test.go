package peers

import (
	"context"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// A ServiceAccount starts with no rights, GrantRole gives exactly the Role's, and a
// kubeconfig written for it authenticates as it.
func TestServiceAccountLeastPrivilege(t *testing.T) {
	k := StartKubeAPIServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := k.ServiceAccountConfig(t, "cove", "reader")
	sa, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sa.DiscoveryV1().EndpointSlices("cove").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("an ungranted ServiceAccount listed EndpointSlices: err = %v, want 403", err)
	}
	k.GrantRole(t, "cove", "reader", "endpointslice-reader", rbacv1.PolicyRule{
		APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"},
	})
	// RBAC changes reach the authorizer through its own informer: allow a moment.
	var listErr error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if _, listErr = sa.DiscoveryV1().EndpointSlices("cove").List(ctx, metav1.ListOptions{}); listErr == nil {
			break
		}
	}
	if listErr != nil {
		t.Fatalf("the granted ServiceAccount cannot list EndpointSlices: %v", listErr)
	}
	// The grant is the Role's and nothing more: other namespaces and resources stay shut.
	if _, err := sa.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("the grant reached another namespace: err = %v, want 403", err)
	}
	if _, err := sa.CoreV1().Secrets("cove").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("the grant reached Secrets: err = %v, want 403", err)
	}

	path := k.WriteKubeconfig(t, cfg)
	fromFile, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		t.Fatalf("load the written kubeconfig: %v", err)
	}
	c, err := kubernetes.NewForConfig(fromFile)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.DiscoveryV1().EndpointSlices("cove").List(ctx, metav1.ListOptions{}); err != nil {
		t.Fatalf("the kubeconfig's identity cannot list EndpointSlices: %v", err)
	}
	if _, err := c.CoreV1().Secrets("cove").List(ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("the kubeconfig is not the ServiceAccount's (Secrets listed): err = %v", err)
	}
}
