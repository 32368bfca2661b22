package kubernetes_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// TestManifestsBuildAndDecodeStrictly: the kustomization builds, every object of a kind
// client-go knows decodes with unknown fields refused, and nothing else is left over but
// the ServiceMonitor and the PodMonitor. Every namespaced object lands in the cove namespace.
func TestManifestsBuildAndDecodeStrictly(t *testing.T) {
	b := build(t, dir())
	for _, want := range []string{
		key("Namespace", "", namespace),
		key("ServiceAccount", namespace, cacheName), key("Role", namespace, "cove-cache-peers"),
		key("RoleBinding", namespace, "cove-cache-peers"), key("Deployment", namespace, cacheName),
		key("Service", namespace, cacheName), key("PodDisruptionBudget", namespace, cacheName),
		key("ServiceAccount", namespace, nodeName), key("DaemonSet", namespace, nodeName),
		key("Role", namespace, "cove-node-caches"), key("RoleBinding", namespace, "cove-node-caches"),
		key("ConfigMap", namespace, "cove-grafana-dashboard"),
	} {
		if _, ok := b.typed[want]; !ok {
			t.Errorf("missing %s", want)
		}
	}
	if len(b.untyped) != 2 || b.untyped[key("ServiceMonitor", namespace, cacheName)] == nil || b.untyped[key("PodMonitor", namespace, nodeName)] == nil {
		t.Errorf("objects outside client-go's scheme: %v; want only the ServiceMonitor and the PodMonitor", b.keys())
	}
	for k, obj := range b.typed {
		if strings.HasPrefix(k, "Namespace/") {
			continue
		}
		if ns := strings.Split(k, "/")[1]; ns != namespace {
			t.Errorf("%s (%T) is in namespace %q, want %q", k, obj, ns, namespace)
		}
	}
}

// TestManifestStrictDecodingRefusesUnknownFields: the attack on the check above. A
// misspelt field, which the API server would drop silently, fails the decoding.
func TestManifestStrictDecodingRefusesUnknownFields(t *testing.T) {
	objs, err := buildYAML(dir())
	if err != nil {
		t.Fatal(err)
	}
	for _, y := range objs {
		if !bytes.Contains(y, []byte("kind: Deployment")) {
			continue
		}
		bad := bytes.Replace(y, []byte("  replicas: 3"), []byte("  replica: 3"), 1)
		if bytes.Equal(bad, y) {
			t.Fatal("no replicas: 3 line to misspell")
		}
		if _, _, err := strictDecoder.Decode(bad, nil, nil); err == nil || !strings.Contains(err.Error(), "replica") {
			t.Fatalf("a misspelt field decoded: %v", err)
		}
		return
	}
	t.Fatal("no Deployment built")
}

// TestManifestCacheWiring: the Service, the probes, the PDB and the RoleBinding find
// the Deployment's pods, ports and ServiceAccount; the drain fits the termination grace
// period; the pod runs as non-root on a read-only root with its writable paths mounted.
func TestManifestCacheWiring(t *testing.T) {
	b := build(t, dir())
	dep := get[*appsv1.Deployment](t, b, "Deployment", namespace, cacheName)
	pod := dep.Spec.Template.Spec
	if dep.Spec.Replicas == nil || *dep.Spec.Replicas != 3 {
		t.Errorf("replicas %v, want 3", dep.Spec.Replicas)
	}
	if !podSelects(t, dep.Spec.Selector, dep.Spec.Template) {
		t.Fatal("the Deployment's selector does not select its own pods")
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Containers))
	}
	c := pod.Containers[0]
	cl := parseArgs(t, cacheName, c.Args)
	if cl.sub != "serve" {
		t.Fatalf("cove-cache %s, want serve", cl.sub)
	}

	svc := get[*corev1.Service](t, b, "Service", namespace, cacheName)
	if len(svc.Spec.Selector) == 0 || !podSelects(t, metaSelector(svc.Spec.Selector), dep.Spec.Template) {
		t.Errorf("Service selector %v does not select the Deployment's pods %v", svc.Spec.Selector, dep.Spec.Template.Labels)
	}
	ds := get[*appsv1.DaemonSet](t, b, "DaemonSet", namespace, nodeName)
	if podSelects(t, metaSelector(svc.Spec.Selector), ds.Spec.Template) {
		t.Error("the Service also selects cove-node's pods")
	}
	var httpPort corev1.ContainerPort
	for _, p := range svc.Spec.Ports {
		cp, ok := containerPort(c, p.TargetPort)
		if !ok {
			t.Errorf("Service port %s targets %s, which the container does not declare", p.Name, p.TargetPort.String())
		}
		if p.Name == "http" {
			httpPort = cp
		}
	}
	if httpPort.ContainerPort == 0 {
		t.Fatal("the Service has no port named http")
	}
	addr, ok := setting(t, cl, cacheConfig(t, b, pod, c, cl), "addr")
	if !ok || !strings.HasSuffix(addr, ":"+itoa(httpPort.ContainerPort)) || strings.HasPrefix(addr, "127.") {
		t.Errorf("cove-cache listens on %q, the container port is %d (and must not be loopback)", addr, httpPort.ContainerPort)
	}
	if _, port := urlPort(t, strings.ReplaceAll(cl.one(t, cacheName, "advertise-url"), "$(POD_IP)", "10.0.0.1")); port != httpPort.ContainerPort {
		t.Errorf("--advertise-url port %d, container port %d", port, httpPort.ContainerPort)
	}
	if !envFromPodIP(c) || !strings.Contains(cl.one(t, cacheName, "advertise-url"), "$(POD_IP)") {
		t.Error("--advertise-url must be built from POD_IP, itself from status.podIP")
	}
	if got := cl.one(t, cacheName, "peers-from-endpointslices"); got != namespace+"/"+svc.Name {
		t.Errorf("--peers-from-endpointslices=%s, want the Service %s/%s", got, namespace, svc.Name)
	}

	for name, probe := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
		want := map[string]string{"readiness": "/readyz", "liveness": "/healthz"}[name]
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != want {
			t.Errorf("%s probe %+v, want GET %s", name, probe, want)
			continue
		}
		if _, ok := containerPort(c, probe.HTTPGet.Port); !ok {
			t.Errorf("%s probe port %s is not a container port", name, probe.HTTPGet.Port.String())
		}
	}
	if r := c.Resources; r.Requests.Cpu().IsZero() || r.Requests.Memory().IsZero() || r.Limits.Memory().IsZero() {
		t.Errorf("resources %+v: want cpu and memory requests and a memory limit", r)
	}

	pdb := get[*policyv1.PodDisruptionBudget](t, b, "PodDisruptionBudget", namespace, cacheName)
	if !podSelects(t, pdb.Spec.Selector, dep.Spec.Template) || podSelects(t, pdb.Spec.Selector, ds.Spec.Template) {
		t.Error("the PDB must select the cove-cache pods and only them")
	}
	if mu := pdb.Spec.MaxUnavailable; (mu == nil || *mu != intstr.FromInt32(1)) && pdb.Spec.MinAvailable == nil {
		t.Errorf("PDB maxUnavailable %v minAvailable %v", mu, pdb.Spec.MinAvailable)
	}
	if len(pod.TopologySpreadConstraints) == 0 || pod.TopologySpreadConstraints[0].TopologyKey != "kubernetes.io/hostname" {
		t.Error("no topology spread over nodes")
	}
	for _, tsc := range pod.TopologySpreadConstraints {
		if !podSelects(t, tsc.LabelSelector, dep.Spec.Template) {
			t.Errorf("topology spread over %s does not count the Deployment's pods", tsc.TopologyKey)
		}
	}

	rb := get[*rbacv1.RoleBinding](t, b, "RoleBinding", namespace, "cove-cache-peers")
	if rb.RoleRef.Kind != "Role" || b.typed[key("Role", namespace, rb.RoleRef.Name)] == nil {
		t.Errorf("RoleBinding refers to %s %s, which is not built", rb.RoleRef.Kind, rb.RoleRef.Name)
	}
	if len(rb.Subjects) != 1 || rb.Subjects[0].Kind != "ServiceAccount" || rb.Subjects[0].Name != pod.ServiceAccountName ||
		rb.Subjects[0].Namespace != namespace {
		t.Errorf("RoleBinding subjects %+v, want the Deployment's ServiceAccount %s/%s", rb.Subjects, namespace, pod.ServiceAccountName)
	}
	if b.typed[key("ServiceAccount", namespace, pod.ServiceAccountName)] == nil {
		t.Errorf("the Deployment runs as ServiceAccount %q, which is not built", pod.ServiceAccountName)
	}

	checkDrainFits(t, dep, c, cl, cacheConfig(t, b, pod, c, cl))
	checkRestricted(t, pod, c, cl, cacheConfig(t, b, pod, c, cl))
}

// metaSelector is a Service's selector as a label selector.
func metaSelector(m map[string]string) *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchLabels: m}
}

func itoa(n int32) string { return strconv.Itoa(int(n)) }

// TestManifestSecretsDocumented: every Secret the manifests read (not shipped: they hold
// credentials) is one docs/kubernetes.md tells how to create, with the same keys.
func TestManifestSecretsDocumented(t *testing.T) {
	b := build(t, dir())
	dep := get[*appsv1.Deployment](t, b, "Deployment", namespace, cacheName)
	doc, err := os.ReadFile(filepath.Join(repoRoot(), "docs", "kubernetes.md"))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{} // secret -> keys
	for _, c := range dep.Spec.Template.Spec.Containers {
		for _, e := range c.Env {
			if r := e.ValueFrom; r != nil && r.SecretKeyRef != nil {
				want[r.SecretKeyRef.Name] = append(want[r.SecretKeyRef.Name], r.SecretKeyRef.Key)
			}
		}
	}
	for _, v := range dep.Spec.Template.Spec.Volumes {
		if v.Secret != nil {
			want[v.Secret.SecretName] = append(want[v.Secret.SecretName], peerSecretKey(t, dep, v.Name))
		}
	}
	if len(want) != 2 {
		t.Errorf("Secrets read: %v; want the S3 credentials and the peer secret", want)
	}
	for name, keys := range want {
		if _, shipped := b.typed[key("Secret", namespace, name)]; shipped {
			t.Errorf("Secret %s is shipped in the manifests: credentials must not be", name)
		}
		line := ""
		for _, l := range strings.Split(string(doc), "\n") {
			if strings.Contains(l, "kubectl -n "+namespace+" create secret generic "+name+" ") {
				line = l
			}
		}
		if line == "" {
			t.Errorf("docs/kubernetes.md does not show `kubectl -n %s create secret generic %s ...`", namespace, name)
			continue
		}
		for _, k := range keys {
			if !strings.Contains(line, "--from-literal="+k+"=") && !strings.Contains(line, "--from-file="+k+"=") {
				t.Errorf("docs/kubernetes.md creates %s without the key %s: %s", name, k, line)
			}
		}
	}
}

// peerSecretKey is the file name --peer-secret-file reads in the Secret volume volName,
// which is the key of the Secret it must hold.
func peerSecretKey(t *testing.T, dep *appsv1.Deployment, volName string) string {
	t.Helper()
	c := dep.Spec.Template.Spec.Containers[0]
	file := parseArgs(t, cacheName, c.Args).one(t, cacheName, "peer-secret-file")
	for _, m := range c.VolumeMounts {
		if m.Name == volName && strings.HasPrefix(file, m.MountPath+"/") {
			return strings.TrimPrefix(file, m.MountPath+"/")
		}
	}
	t.Fatalf("--peer-secret-file=%s is not in the Secret volume %s", file, volName)
	return ""
}
