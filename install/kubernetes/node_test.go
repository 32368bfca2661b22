package kubernetes_test

import (
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// TestManifestNodeWiring: the cove-node DaemonSet installs through `cove-node install`
// into the node's / (mounted whole at --host-root, where the installer chroots to check
// containerd), with systemctl run in the node's namespaces; points cove-node at the
// cove-cache Service's cluster IP and named port (the node's cove-node has no cluster
// DNS); runs `cove-node uninstall` with the same root and systemctl before the pod goes;
// and reports `cove-node doctor` on the same root and address as its readiness.
func TestManifestNodeWiring(t *testing.T) {
	b := build(t, dir())
	ds := get[*appsv1.DaemonSet](t, b, "DaemonSet", namespace, nodeName)
	pod := ds.Spec.Template.Spec
	if !podSelects(t, ds.Spec.Selector, ds.Spec.Template) {
		t.Fatal("the DaemonSet's selector does not select its own pods")
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Error("mount no default token: cove-node on the host reads the API with the cove-node-token volume's")
	}
	if !slices.ContainsFunc(pod.Tolerations, func(tol corev1.Toleration) bool {
		return tol.Operator == corev1.TolerationOpExists && tol.Key == ""
	}) {
		t.Error("cove-node must run on every node, tainted ones included")
	}
	if len(pod.InitContainers) != 1 || len(pod.Containers) != 1 {
		t.Fatalf("%d init containers and %d containers, want 1 and 1", len(pod.InitContainers), len(pod.Containers))
	}
	init := pod.InitContainers[0]
	install := parseArgs(t, "install", init.Args)
	if len(init.Command) != 1 || filepath.Base(init.Command[0]) != "cove-node" || install.sub != "install" {
		t.Fatalf("the init container runs %q %s, want cove-node install", init.Command, install.sub)
	}
	hostRoot := install.one(t, "install", "host-root")
	systemctl := install.one(t, "install", "systemctl")
	if !strings.HasPrefix(systemctl, "nsenter --target 1 ") || !pod.HostPID {
		t.Errorf("--systemctl=%q: systemctl must run in the node's namespaces (nsenter --target 1, hostPID)", systemctl)
	}
	for _, c := range []corev1.Container{init, pod.Containers[0]} {
		if !mountsHostRoot(pod, c, hostRoot) {
			t.Errorf("container %s does not mount the node's / writable at %s", c.Name, hostRoot)
		}
		if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
			t.Errorf("container %s is not privileged: nsenter into the node's namespaces needs it", c.Name)
		}
	}

	svc := get[*corev1.Service](t, b, "Service", namespace, cacheName)
	envName := strings.ToUpper(strings.ReplaceAll(svc.Name, "-", "_"))
	caches := install.flags["cache"]
	if len(caches) != 1 {
		t.Fatalf("install --cache %q, want the Service once", caches)
	}
	for _, p := range svc.Spec.Ports {
		want := "http://$(" + envName + "_SERVICE_HOST):$(" + envName + "_SERVICE_PORT_" + strings.ToUpper(p.Name) + ")"
		if p.Name == "http" && caches[0] != want {
			t.Errorf("install --cache=%s, want %s (the Service's cluster IP and port %s, as the kubelet sets them)", caches[0], want, p.Name)
		}
	}
	objs, err := buildYAML(dir())
	if err != nil {
		t.Fatal(err)
	}
	if svcAt, dsAt := objectIndex(t, objs, "Service", svc.Name), objectIndex(t, objs, "DaemonSet", ds.Name); svcAt > dsAt {
		t.Errorf("the build applies the DaemonSet (object %d) before the Service (object %d) its pods read the address of", dsAt, svcAt)
	}
	if pod.EnableServiceLinks != nil && !*pod.EnableServiceLinks {
		t.Error("enableServiceLinks is off: $(" + envName + "_SERVICE_HOST) would not be set")
	}
	addr := install.one(t, "install", "addr")
	if host, _, err := net.SplitHostPort(addr); err != nil || !net.ParseIP(host).IsLoopback() {
		t.Errorf("install --addr=%s: want a loopback HOST:PORT", addr)
	}

	hold := pod.Containers[0]
	if len(hold.Command) == 0 || hold.Command[0] != "sleep" {
		t.Errorf("the main container runs %q: it only holds the install (cove-node runs under the node's systemd)", hold.Command)
	}
	if hold.Lifecycle == nil || hold.Lifecycle.PreStop == nil || hold.Lifecycle.PreStop.Exec == nil {
		t.Fatal("no preStop hook: deleting the DaemonSet would leave cove-node installed")
	}
	cmd := hold.Lifecycle.PreStop.Exec.Command
	if len(cmd) < 2 || filepath.Base(cmd[0]) != "cove-node" {
		t.Fatalf("preStop runs %q, want cove-node uninstall", cmd)
	}
	uninstall := parseArgs(t, "preStop", cmd[1:])
	if uninstall.sub != "uninstall" || uninstall.one(t, "preStop", "host-root") != hostRoot || uninstall.one(t, "preStop", "systemctl") != systemctl {
		t.Errorf("preStop runs %q, want cove-node uninstall --host-root=%s --systemctl=%q", cmd, hostRoot, systemctl)
	}
	rp := hold.ReadinessProbe
	if rp == nil || rp.Exec == nil || len(rp.Exec.Command) < 2 || filepath.Base(rp.Exec.Command[0]) != "cove-node" {
		t.Fatal("readiness is not cove-node doctor")
	}
	doctor := parseArgs(t, "readiness", rp.Exec.Command[1:])
	if doctor.sub != "doctor" || doctor.one(t, "doctor", "host-root") != hostRoot || doctor.one(t, "doctor", "addr") != addr {
		t.Errorf("readiness runs %q, want cove-node doctor --host-root=%s --addr=%s", rp.Exec.Command, hostRoot, addr)
	}
	if !pod.HostNetwork {
		t.Error("doctor probes cove-node on the node's loopback: the pod needs hostNetwork")
	}
	if tgps := pod.TerminationGracePeriodSeconds; tgps == nil || *tgps < 30 {
		t.Error("give the preStop uninstall (a containerd restart) time: terminationGracePeriodSeconds >= 30")
	}
}

// mountsHostRoot reports whether c mounts the hostPath / read-write at hostRoot.
func mountsHostRoot(pod corev1.PodSpec, c corev1.Container, hostRoot string) bool {
	for _, m := range c.VolumeMounts {
		if m.MountPath != hostRoot || m.ReadOnly {
			continue
		}
		for _, v := range pod.Volumes {
			if v.Name == m.Name && v.HostPath != nil && v.HostPath.Path == "/" {
				return true
			}
		}
	}
	return false
}

// objectIndex is the position of kind/name in the build's output, the order kubectl
// applies it in.
func objectIndex(t *testing.T, objs [][]byte, kind, name string) int {
	t.Helper()
	for i, y := range objs {
		var meta struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(y, &meta); err != nil {
			t.Fatal(err)
		}
		if meta.Kind == kind && meta.Metadata.Name == name {
			return i
		}
	}
	t.Fatalf("%s %s not built", kind, name)
	return -1
}

// TestManifestNodeReadsReplicas: the DaemonSet's install points cove-node at the cove-cache
// Service's EndpointSlices in the pod's own namespace, on the Service's http port, and
// reads the API with a token the kubelet keeps current: a projected ServiceAccount token
// of this pod, named by the path the node sees it at (the pod's UID), with the API
// server's CA mounted where the install reads it.
func TestManifestNodeReadsReplicas(t *testing.T) {
	b := build(t, dir())
	ds := get[*appsv1.DaemonSet](t, b, "DaemonSet", namespace, nodeName)
	pod := ds.Spec.Template.Spec
	init := pod.InitContainers[0]
	install := parseArgs(t, "install", init.Args)
	svc := get[*corev1.Service](t, b, "Service", namespace, cacheName)
	if got, want := install.one(t, "install", "caches-from-endpointslices"), "$(POD_NAMESPACE)/"+svc.Name; got != want {
		t.Errorf("install --caches-from-endpointslices=%s, want %s", got, want)
	}
	portName := "http" // cove-node's default
	if v := install.flags["caches-port-name"]; len(v) > 0 {
		portName = v[0]
	}
	if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == portName }) {
		t.Errorf("the Service has no port named %q for cove-node's --caches-port-name", portName)
	}
	fieldOf := func(name string) string {
		for _, e := range init.Env {
			if e.Name == name && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
				return e.ValueFrom.FieldRef.FieldPath
			}
		}
		return ""
	}
	if fieldOf("POD_NAMESPACE") != "metadata.namespace" || fieldOf("POD_UID") != "metadata.uid" {
		t.Errorf("the init container's POD_NAMESPACE and POD_UID are %q and %q, want metadata.namespace and metadata.uid", fieldOf("POD_NAMESPACE"), fieldOf("POD_UID"))
	}

	tokenFile := install.one(t, "install", "kube-token-file")
	const prefix = "/var/lib/kubelet/pods/$(POD_UID)/volumes/kubernetes.io~projected/"
	volName, ok := strings.CutPrefix(tokenFile, prefix)
	volName, ok2 := strings.CutSuffix(volName, "/token")
	if !ok || !ok2 || strings.Contains(volName, "/") {
		t.Fatalf("install --kube-token-file=%s, want %s<volume>/token", tokenFile, prefix)
	}
	var vol *corev1.Volume
	for i := range pod.Volumes {
		if pod.Volumes[i].Name == volName {
			vol = &pod.Volumes[i]
		}
	}
	if vol == nil || vol.Projected == nil {
		t.Fatalf("--kube-token-file names volume %q, which is not a projected volume of the pod", volName)
	}
	var token, ca bool
	for _, src := range vol.Projected.Sources {
		if st := src.ServiceAccountToken; st != nil && st.Path == "token" && st.Audience == "" {
			token = true
		}
		if cm := src.ConfigMap; cm != nil && cm.Name == "kube-root-ca.crt" {
			ca = slices.ContainsFunc(cm.Items, func(k corev1.KeyToPath) bool { return k.Key == "ca.crt" && k.Path == "ca.crt" })
		}
	}
	if !token || !ca {
		t.Errorf("volume %s: ServiceAccount token at token %v, the API server's CA at ca.crt %v; want both", volName, token, ca)
	}
	caFile := "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt" // install's --kube-ca-file default
	if v := install.flags["kube-ca-file"]; len(v) > 0 {
		caFile = v[0]
	}
	if !slices.ContainsFunc(init.VolumeMounts, func(m corev1.VolumeMount) bool {
		return m.Name == volName && m.MountPath == filepath.Dir(caFile)
	}) {
		t.Errorf("the init container does not mount %s at %s, where the install reads the CA", volName, filepath.Dir(caFile))
	}
}
