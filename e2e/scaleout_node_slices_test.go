package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	discoveryv1client "k8s.io/client-go/kubernetes/typed/discovery/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/cove-oci/cove/internal/peers"
)

// cove-node started with --caches-from-endpointslices, reading the API with a kubeconfig
// that names a token file (as the one the DaemonSet's install writes), follows the cove-cache Service's
// ready endpoints on a real kube-apiserver, read with a ServiceAccount granted only
// get/list/watch on endpointslices: its cache list (cove_node_cache_up) is the --cache
// URL alone while the Service has no endpoint, then the members as they join and leave
// (not ready, slice deleted), with the --cache URL after them. A node whose
// ServiceAccount lacks the grant says so in its log, serves through the --cache URL, and
// picks the members up once the grant is made (it watches again after a pause).
//
// The API refuses loopback endpoint addresses, so the slices name addresses no replica
// is at: this checks the list the node uses, not pulls through it (those are
// TestScaleOutNodeSendsMissToOwner, over --cache).
func TestScaleOutNodeEndpointSlices(t *testing.T) {
	kube := peers.StartKubeAPIServer(t)
	const ns, svc = "cove", "cove-cache"
	kube.EnsureNamespace(t, ns)
	rule := rbacv1.PolicyRule{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"get", "list", "watch"}}
	granted := kube.ServiceAccountConfig(t, ns, "cove-node")
	kube.GrantRole(t, ns, "cove-node", "cove-node-caches", rule)
	late := kube.ServiceAccountConfig(t, ns, "cove-node-late")

	origin := peers.StartRegistry(t)
	service := peers.StartCove(t, t.TempDir(), "--origin-plain-http", origin.Addr)
	start := func(kubeconfig string) *peers.CoveNode {
		return peers.StartCoveNode(t, []string{service.URL}, "--origin-plain-http", origin.Addr,
			"--caches-from-endpointslices", ns+"/"+svc, "--kubeconfig", kubeconfig)
	}
	node := start(tokenFileKubeconfig(t, granted))

	admin := kube.AdminClient(t).DiscoveryV1().EndpointSlices(ns)
	ctx := context.Background()
	publish := func(i int, ready bool) {
		t.Helper()
		publishSlice(t, admin, svc, i, ready)
	}
	flag := service.URL + " flag"
	member := func(i int) string { return fmt.Sprintf("http://10.0.7.%d:5005 members", i+1) }

	waitCacheList(t, node, flag)
	publish(0, true)
	publish(1, true)
	waitCacheList(t, node, member(0), member(1), flag)
	publish(2, true) // joins
	waitCacheList(t, node, member(0), member(1), member(2), flag)
	publish(1, false) // leaves: not ready
	waitCacheList(t, node, member(0), member(2), flag)
	if err := admin.Delete(ctx, svc+"-0", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitCacheList(t, node, member(2), flag)

	// Without the grant: refused, said in the log, the --cache URL in use; granted, the
	// members are picked up.
	refused := start(kube.WriteKubeconfig(t, late))
	for deadline := time.Now().Add(30 * time.Second); !nodeLogged(t, refused, "cove-cache replicas unknown"); {
		if time.Now().After(deadline) {
			t.Fatal("a cove-node refused the EndpointSlices did not log it")
		}
		time.Sleep(50 * time.Millisecond)
	}
	waitCacheList(t, refused, flag)
	kube.GrantRole(t, ns, "cove-node-late", "cove-node-late-caches", rule)
	waitCacheListWithin(t, 90*time.Second, refused, member(2), flag) // its next watch: the pause doubles up to a minute
}

// publishSlice creates or updates EndpointSlice i of svc: one endpoint,
// 10.0.7.(i+1):5005 on the port named http.
func publishSlice(t *testing.T, admin discoveryv1client.EndpointSliceInterface, svc string, i int, ready bool) {
	t.Helper()
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name:   fmt.Sprintf("%s-%d", svc, i),
			Labels: map[string]string{discoveryv1.LabelServiceName: svc},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{
			Addresses:  []string{fmt.Sprintf("10.0.7.%d", i+1)},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
		}},
		Ports: []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(5005)), Protocol: ptr(corev1.ProtocolTCP)}},
	}
	ctx := context.Background()
	if _, err := admin.Get(ctx, s.Name, metav1.GetOptions{}); err == nil {
		if _, err := admin.Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		return
	}
	if _, err := admin.Create(ctx, s, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// nodeLogged reports whether cove-node's log has a line whose message contains msg.
func nodeLogged(t *testing.T, n *peers.CoveNode, msg string) bool {
	return logged(t, &peers.Cove{LogPath: n.LogPath}, msg)
}

// cacheList is cove-node's cove_node_cache_up series as "URL source", in order.
func cacheList(t *testing.T, n *peers.CoveNode) []string {
	t.Helper()
	resp, err := http.Get(n.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	f := families["cove_node_cache_up"]
	if f == nil {
		return nil
	}
	for _, m := range f.Metric {
		out = append(out, label(m, "cache")+" "+label(m, "source"))
	}
	// Members first (sorted), then the --cache URLs: the order requests fall back in.
	slices.SortStableFunc(out, func(a, b string) int {
		am, bm := strings.HasSuffix(a, " members"), strings.HasSuffix(b, " members")
		switch {
		case am && !bm:
			return -1
		case bm && !am:
			return 1
		}
		return strings.Compare(a, b)
	})
	return out
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.Label {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

func waitCacheList(t *testing.T, n *peers.CoveNode, want ...string) {
	t.Helper()
	waitCacheListWithin(t, 30*time.Second, n, want...)
}

func waitCacheListWithin(t *testing.T, within time.Duration, n *peers.CoveNode, want ...string) {
	t.Helper()
	var got []string
	for deadline := time.Now().Add(within); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if got = cacheList(t, n); slices.Equal(got, want) {
			return
		}
	}
	t.Fatalf("cove-node's caches %q, want %q\n%s", got, want, s3LogTail(n.LogPath))
}

// tokenFileKubeconfig writes cfg's token to a file and a kubeconfig that names that file
// (tokenFile), the form cove-node install --kube-token-file writes for the DaemonSet.
func tokenFileKubeconfig(t *testing.T, cfg *rest.Config) string {
	t.Helper()
	dir := t.TempDir()
	token := filepath.Join(dir, "token")
	if err := os.WriteFile(token, []byte(cfg.BearerToken), 0o600); err != nil {
		t.Fatal(err)
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["c"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["u"] = &clientcmdapi.AuthInfo{TokenFile: token}
	kc.Contexts["c"] = &clientcmdapi.Context{Cluster: "c", AuthInfo: "u"}
	kc.CurrentContext = "c"
	path := filepath.Join(dir, "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		t.Fatal(err)
	}
	return path
}
