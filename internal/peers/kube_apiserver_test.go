package peers

import (
	"context"
	"net/http"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

func TestKubeAPIServerAdminAndStop(t *testing.T) {
	k := StartKubeAPIServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nss, err := k.AdminClient(t).CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("admin lists namespaces: %v", err)
	}
	if len(nss.Items) == 0 {
		t.Fatal("a fresh API server lists no namespace (want default, kube-system...)")
	}
	// A token the server does not know is refused, not treated as anonymous.
	bogus, err := kubernetes.NewForConfig(k.Config("not-a-token"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bogus.CoreV1().Namespaces().List(ctx, metav1.ListOptions{}); !apierrors.IsUnauthorized(err) {
		t.Fatalf("an unknown token listed namespaces: err = %v, want 401", err)
	}
	k.Stop()
	if done, _ := k.proc.exited(); !done {
		t.Fatal("kube-apiserver still runs after Stop")
	}
	if done, _ := k.etcd.proc.exited(); !done {
		t.Fatal("etcd still runs after Stop")
	}
	if _, err := (&http.Client{Timeout: 2 * time.Second}).Get(k.URL + "/readyz"); err == nil {
		t.Fatal("something still answers at the stopped server's address")
	}
}
