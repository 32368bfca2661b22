package kubernetes_test

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// podMonitorSpec is the part of monitoring.coreos.com/v1 PodMonitor cove uses.
type podMonitorSpec struct {
	Selector          *metav1.LabelSelector `json:"selector"`
	NamespaceSelector struct {
		Any        bool     `json:"any"`
		MatchNames []string `json:"matchNames"`
	} `json:"namespaceSelector"`
	PodMetricsEndpoints []struct {
		Port     string `json:"port"`
		Path     string `json:"path"`
		Interval string `json:"interval"`
		Scheme   string `json:"scheme"`
	} `json:"podMetricsEndpoints"`
}

// podMonitor decodes the cove-node PodMonitor (outside client-go's scheme) strictly.
func podMonitor(t *testing.T, b *built) podMonitorSpec {
	t.Helper()
	u := b.untyped[key("PodMonitor", namespace, nodeName)]
	if u == nil {
		t.Fatalf("no PodMonitor; built %v", b.keys())
	}
	if u.GetAPIVersion() != "monitoring.coreos.com/v1" {
		t.Errorf("apiVersion %s", u.GetAPIVersion())
	}
	raw, ok, err := unstructured.NestedMap(u.Object, "spec")
	if err != nil || !ok {
		t.Fatalf("no spec: %v", err)
	}
	var spec podMonitorSpec
	if err := k8sruntime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(raw, &spec, true); err != nil {
		t.Fatalf("spec: %v", err)
	}
	return spec
}

// TestManifestPodMonitor: the PodMonitor selects the cove-node DaemonSet's pods in the
// cove namespace and scrapes, at /metrics, the port the hold container declares, which is
// the port the install gives cove-node's --metrics-addr, bound on the node's address
// (NODE_IP from status.hostIP), which is the pod's (hostNetwork).
func TestManifestPodMonitor(t *testing.T) {
	b := build(t, dir())
	spec := podMonitor(t, b)
	ds := get[*appsv1.DaemonSet](t, b, "DaemonSet", namespace, nodeName)
	if err := podMonitorMismatch(spec, ds); err != nil {
		t.Error(err)
	}
}

// TestPodMonitorCheckCatchesMistakes: the attack on the check above: each way the
// PodMonitor and the DaemonSet can drift apart is reported.
func TestPodMonitorCheckCatchesMistakes(t *testing.T) {
	b := build(t, dir())
	for name, spoil := range map[string]func(*podMonitorSpec, *appsv1.DaemonSet){
		"another port name": func(s *podMonitorSpec, _ *appsv1.DaemonSet) { s.PodMetricsEndpoints[0].Port = "http" },
		"another path":      func(s *podMonitorSpec, _ *appsv1.DaemonSet) { s.PodMetricsEndpoints[0].Path = "/v2/" },
		"another namespace": func(s *podMonitorSpec, _ *appsv1.DaemonSet) { s.NamespaceSelector.MatchNames = []string{"default"} },
		"another selector": func(s *podMonitorSpec, _ *appsv1.DaemonSet) {
			s.Selector = &metav1.LabelSelector{MatchLabels: map[string]string{"app.kubernetes.io/name": "cove-cache"}}
		},
		"container port moved": func(_ *podMonitorSpec, ds *appsv1.DaemonSet) {
			ds.Spec.Template.Spec.Containers[0].Ports[0].ContainerPort = 9100
		},
		"metrics-addr on loopback": func(_ *podMonitorSpec, ds *appsv1.DaemonSet) {
			setArg(ds, "--metrics-addr=", "127.0.0.1:5007")
		},
		"no metrics-addr": func(_ *podMonitorSpec, ds *appsv1.DaemonSet) { setArg(ds, "--metrics-addr=", "") },
		"NODE_IP from the pod IP": func(_ *podMonitorSpec, ds *appsv1.DaemonSet) {
			for i, e := range ds.Spec.Template.Spec.InitContainers[0].Env {
				if e.Name == "NODE_IP" {
					ds.Spec.Template.Spec.InitContainers[0].Env[i].ValueFrom.FieldRef.FieldPath = "status.podIP"
				}
			}
		},
		"no hostNetwork": func(_ *podMonitorSpec, ds *appsv1.DaemonSet) { ds.Spec.Template.Spec.HostNetwork = false },
	} {
		spec := podMonitor(t, b)
		ds := get[*appsv1.DaemonSet](t, b, "DaemonSet", namespace, nodeName).DeepCopy()
		spoil(&spec, ds)
		if err := podMonitorMismatch(spec, ds); err == nil {
			t.Errorf("%s: not caught", name)
		}
	}
}

// setArg replaces the install's argument with prefix by prefix+value (removes it when
// value is empty).
func setArg(ds *appsv1.DaemonSet, prefix, value string) {
	init := &ds.Spec.Template.Spec.InitContainers[0]
	var args []string
	for _, a := range init.Args {
		if strings.HasPrefix(a, prefix) {
			if value == "" {
				continue
			}
			a = prefix + value
		}
		args = append(args, a)
	}
	init.Args = args
}

// podMonitorMismatch says how the PodMonitor fails to scrape the cove-node that the
// DaemonSet installs (nil: it scrapes it).
func podMonitorMismatch(spec podMonitorSpec, ds *appsv1.DaemonSet) error {
	pod := ds.Spec.Template.Spec
	sel, err := metav1.LabelSelectorAsSelector(spec.Selector)
	if spec.Selector == nil || err != nil || sel.Empty() || !sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
		return fmt.Errorf("selector %+v does not select the DaemonSet's pods (labels %v): %v", spec.Selector, ds.Spec.Template.Labels, err)
	}
	if !spec.NamespaceSelector.Any && !slices.Contains(spec.NamespaceSelector.MatchNames, namespace) {
		return fmt.Errorf("namespaceSelector %+v leaves out %s", spec.NamespaceSelector, namespace)
	}
	if len(spec.PodMetricsEndpoints) == 0 {
		return errors.New("no podMetricsEndpoints")
	}
	if !pod.HostNetwork {
		return errors.New("the pod is not on the host's network: cove-node's metrics listener, on the host, is not at the pod's IP")
	}
	if len(pod.InitContainers) != 1 || len(pod.Containers) == 0 {
		return errors.New("want the install init container and the hold container")
	}
	init := pod.InitContainers[0]
	var metricsAddr []string
	for _, a := range init.Args {
		if v, ok := strings.CutPrefix(a, "--metrics-addr="); ok {
			metricsAddr = append(metricsAddr, v)
		}
	}
	if len(metricsAddr) != 1 {
		return fmt.Errorf("install has --metrics-addr %q, want one", metricsAddr)
	}
	host, port, err := net.SplitHostPort(metricsAddr[0])
	if err != nil || host != "$(NODE_IP)" {
		return fmt.Errorf("install --metrics-addr=%s: want [$(NODE_IP)]:PORT, the node's address: %v", metricsAddr[0], err)
	}
	if !slices.ContainsFunc(init.Env, func(e corev1.EnvVar) bool {
		return e.Name == "NODE_IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.hostIP"
	}) {
		return errors.New("the install container's NODE_IP is not the downward API's status.hostIP")
	}
	for _, e := range spec.PodMetricsEndpoints {
		if e.Path != "/metrics" || (e.Scheme != "" && e.Scheme != "http") {
			return fmt.Errorf("endpoint %+v: want /metrics over http", e)
		}
		found := false
		for _, c := range pod.Containers {
			cp, ok := containerPort(c, intstr.FromString(e.Port))
			if !ok {
				continue
			}
			found = true
			if strconv.Itoa(int(cp.ContainerPort)) != port || (cp.HostPort != 0 && cp.HostPort != cp.ContainerPort) {
				return fmt.Errorf("port %s is %d (host port %d), but cove-node's --metrics-addr=%s", e.Port, cp.ContainerPort, cp.HostPort, metricsAddr[0])
			}
		}
		if !found {
			return fmt.Errorf("endpoint port %q: no container of the DaemonSet declares it", e.Port)
		}
	}
	return nil
}
