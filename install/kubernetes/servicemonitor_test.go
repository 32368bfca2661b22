package kubernetes_test

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
)

// serviceMonitorSpec is the part of monitoring.coreos.com/v1 ServiceMonitor cove uses.
type serviceMonitorSpec struct {
	Selector          *metav1.LabelSelector `json:"selector"`
	NamespaceSelector struct {
		Any        bool     `json:"any"`
		MatchNames []string `json:"matchNames"`
	} `json:"namespaceSelector"`
	Endpoints []struct {
		Port     string `json:"port"`
		Path     string `json:"path"`
		Interval string `json:"interval"`
		Scheme   string `json:"scheme"`
	} `json:"endpoints"`
}

// TestManifestServiceMonitor: the ServiceMonitor (outside client-go's scheme, decoded as
// unstructured) has its required fields and scrapes the cove-cache Service's http port
// at /metrics.
func TestManifestServiceMonitor(t *testing.T) {
	b := build(t, dir())
	u := b.untyped[key("ServiceMonitor", namespace, cacheName)]
	if u == nil {
		t.Fatalf("no ServiceMonitor; built %v", b.keys())
	}
	if u.GetAPIVersion() != "monitoring.coreos.com/v1" {
		t.Errorf("apiVersion %s", u.GetAPIVersion())
	}
	raw, ok, err := unstructured.NestedMap(u.Object, "spec")
	if err != nil || !ok {
		t.Fatalf("no spec: %v", err)
	}
	var spec serviceMonitorSpec
	if err := k8sruntime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(raw, &spec, true); err != nil {
		t.Fatalf("spec: %v", err)
	}
	svc := get[*corev1.Service](t, b, "Service", namespace, cacheName)
	sel, err := metav1.LabelSelectorAsSelector(spec.Selector)
	if spec.Selector == nil || err != nil || sel.Empty() || !sel.Matches(labels.Set(svc.Labels)) {
		t.Errorf("selector %+v does not select the Service (labels %v): %v", spec.Selector, svc.Labels, err)
	}
	if !spec.NamespaceSelector.Any && !slices.Contains(spec.NamespaceSelector.MatchNames, namespace) {
		t.Errorf("namespaceSelector %+v leaves out %s", spec.NamespaceSelector, namespace)
	}
	if len(spec.Endpoints) == 0 {
		t.Fatal("no endpoints")
	}
	for _, e := range spec.Endpoints {
		found := false
		for _, p := range svc.Spec.Ports {
			found = found || p.Name == e.Port
		}
		if !found || e.Path != "/metrics" || (e.Scheme != "" && e.Scheme != "http") {
			t.Errorf("endpoint %+v: want a Service port name, /metrics over http", e)
		}
	}
}
