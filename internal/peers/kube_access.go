package peers

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/utils/ptr"
)

// ServiceAccountConfig creates namespace and ServiceAccount name in it (when missing)
// and returns a client configuration with a fresh token of that ServiceAccount, the
// identity a cove-cache pod has. It is granted nothing: bind it with GrantRole.
func (k *KubeAPIServer) ServiceAccountConfig(t testing.TB, namespace, name string) *rest.Config {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin := k.AdminClient(t)
	k.EnsureNamespace(t, namespace)
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace}}
	if _, err := admin.CoreV1().ServiceAccounts(namespace).Create(ctx, sa, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("peers: create ServiceAccount %s/%s: %v", namespace, name, err)
	}
	tr, err := admin.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](3600)},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("peers: token for ServiceAccount %s/%s: %v", namespace, name, err)
	}
	return k.Config(tr.Status.Token)
}

// EnsureNamespace creates namespace when it does not exist yet.
func (k *KubeAPIServer) EnsureNamespace(t testing.TB, namespace string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}
	if _, err := k.AdminClient(t).CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("peers: create namespace %s: %v", namespace, err)
	}
}

// GrantRole creates a Role named role in namespace with rules and binds it to the
// ServiceAccount serviceAccount of that namespace: the least-privilege grant a
// deployment's RBAC would make.
func (k *KubeAPIServer) GrantRole(t testing.TB, namespace, serviceAccount, role string, rules ...rbacv1.PolicyRule) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	admin := k.AdminClient(t)
	r := &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: role, Namespace: namespace}, Rules: rules}
	if _, err := admin.RbacV1().Roles(namespace).Create(ctx, r, metav1.CreateOptions{}); err != nil {
		t.Fatalf("peers: create Role %s/%s: %v", namespace, role, err)
	}
	b := &rbacv1.RoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: role, Namespace: namespace},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: role},
		Subjects:   []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: serviceAccount, Namespace: namespace}},
	}
	if _, err := admin.RbacV1().RoleBindings(namespace).Create(ctx, b, metav1.CreateOptions{}); err != nil {
		t.Fatalf("peers: create RoleBinding %s/%s: %v", namespace, role, err)
	}
}

// WriteKubeconfig writes cfg (a configuration from this server: its URL, CA and bearer
// token) as a kubeconfig file in a temporary directory and returns its path, for a
// process under test that takes --kubeconfig. The file is readable by its owner only.
func (k *KubeAPIServer) WriteKubeconfig(t testing.TB, cfg *rest.Config) string {
	t.Helper()
	kc := clientcmdapi.Config{
		Clusters:       map[string]*clientcmdapi.Cluster{"cove-test": {Server: cfg.Host, CertificateAuthorityData: cfg.CAData}},
		AuthInfos:      map[string]*clientcmdapi.AuthInfo{"cove-test": {Token: cfg.BearerToken}},
		Contexts:       map[string]*clientcmdapi.Context{"cove-test": {Cluster: "cove-test", AuthInfo: "cove-test"}},
		CurrentContext: "cove-test",
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(kc, path); err != nil {
		t.Fatalf("peers: write kubeconfig: %v", err)
	}
	return path
}
