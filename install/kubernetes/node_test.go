package kubernetes_test

import (
	"net"
	"path/filepath"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// TestManifestNodeWiring: the cove-node DaemonSet installs through `cove-node install`
// into the host paths it mounts, runs cove-node on the node's loopback where containerd
// and the kubelet's probes reach it, points it at the cove-cache Service, and runs
// `cove-node uninstall` on the same host root before it stops.
func TestManifestNodeWiring(t *testing.T) {
	b := build(t, dir())
	ds := get[*appsv1.DaemonSet](t, b, "DaemonSet", namespace, nodeName)
	pod := ds.Spec.Template.Spec
	if !podSelects(t, ds.Spec.Selector, ds.Spec.Template) {
		t.Fatal("the DaemonSet's selector does not select its own pods")
	}
	if !pod.HostNetwork || pod.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Error("cove-node must share the node's network (containerd dials its loopback) and resolve Service names (ClusterFirstWithHostNet)")
	}
	if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
		t.Error("cove-node calls no Kubernetes API: mount no token")
	}
	hasToleration := false
	for _, tol := range pod.Tolerations {
		hasToleration = hasToleration || (tol.Operator == corev1.TolerationOpExists && tol.Key == "")
	}
	if !hasToleration {
		t.Error("cove-node must run on every node, tainted ones included")
	}
	if len(pod.InitContainers) != 1 || len(pod.Containers) != 1 {
		t.Fatalf("%d init containers and %d containers, want 1 and 1", len(pod.InitContainers), len(pod.Containers))
	}
	install := parseArgs(t, "install", pod.InitContainers[0].Args)
	if filepath.Base(pod.InitContainers[0].Command[0]) != "cove-node" || install.sub != "install" {
		t.Fatalf("the init container runs %q %s, want cove-node install", pod.InitContainers[0].Command, install.sub)
	}
	hostRoot := install.one(t, "install", "host-root")
	for _, c := range []corev1.Container{pod.InitContainers[0], pod.Containers[0]} {
		checkHostMounts(t, pod, c, hostRoot)
	}

	main := pod.Containers[0]
	serve := parseArgs(t, "cove-node", main.Args)
	if filepath.Base(main.Command[0]) != "cove-node" || serve.sub != "serve" {
		t.Fatalf("the container runs %q %s, want cove-node serve", main.Command, serve.sub)
	}
	addr := serve.one(t, "cove-node serve", "addr")
	if got := install.one(t, "install", "addr"); got != addr {
		t.Errorf("install points containerd at %s, cove-node serves %s", got, addr)
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil || !net.ParseIP(host).IsLoopback() {
		t.Fatalf("cove-node --addr=%s: want a loopback HOST:PORT", addr)
	}
	for name, probe := range map[string]*corev1.Probe{"readiness": main.ReadinessProbe, "liveness": main.LivenessProbe} {
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Host != host || probe.HTTPGet.Path != "/healthz" {
			t.Errorf("%s probe %+v: want GET http://%s/healthz (cove-node listens on loopback only)", name, probe, addr)
			continue
		}
		cp, ok := containerPort(main, probe.HTTPGet.Port)
		if !ok || itoa(cp.ContainerPort) != port {
			t.Errorf("%s probe port %s is not cove-node's port %s", name, probe.HTTPGet.Port.String(), port)
		}
	}

	svc := get[*corev1.Service](t, b, "Service", namespace, cacheName)
	for who, cl := range map[string]cmdline{"install": install, "serve": serve} {
		for _, cache := range cl.flags["cache"] {
			h, p := urlPort(t, cache)
			if h != svc.Name+"."+namespace+".svc.cluster.local" && h != svc.Name+"."+namespace+".svc" {
				t.Errorf("%s --cache=%s does not name the Service %s/%s", who, cache, namespace, svc.Name)
			}
			if len(svc.Spec.Ports) == 0 || svc.Spec.Ports[0].Port != p {
				t.Errorf("%s --cache=%s: the Service's port is %v", who, cache, svc.Spec.Ports)
			}
		}
		if len(cl.flags["cache"]) == 0 {
			t.Errorf("%s has no --cache", who)
		}
	}

	pre := main.Lifecycle
	if pre == nil || pre.PreStop == nil || pre.PreStop.Exec == nil {
		t.Fatal("no preStop hook: deleting the DaemonSet would leave containerd pointed at a cove-node that is gone")
	}
	cmd := pre.PreStop.Exec.Command
	if len(cmd) < 2 || filepath.Base(cmd[0]) != "cove-node" {
		t.Fatalf("preStop runs %q, want cove-node uninstall", cmd)
	}
	uninstall := parseArgs(t, "preStop", cmd[1:])
	if uninstall.sub != "uninstall" || uninstall.one(t, "preStop", "host-root") != hostRoot {
		t.Errorf("preStop runs %q, want cove-node uninstall --host-root=%s", cmd, hostRoot)
	}
	if ds.Spec.Template.Spec.TerminationGracePeriodSeconds == nil || *ds.Spec.Template.Spec.TerminationGracePeriodSeconds < 10 {
		t.Error("give preStop's uninstall time: terminationGracePeriodSeconds >= 10")
	}
}

// checkHostMounts: every mount under hostRoot is the host's own path (hostPath P mounted
// at hostRoot+P), so the installer's paths are the host's; containerd's configuration,
// the binary directory and the backups are among them.
func checkHostMounts(t *testing.T, pod corev1.PodSpec, c corev1.Container, hostRoot string) {
	t.Helper()
	mounted := map[string]bool{}
	for _, m := range c.VolumeMounts {
		if !strings.HasPrefix(m.MountPath, hostRoot+"/") {
			continue
		}
		for _, v := range pod.Volumes {
			if v.Name != m.Name {
				continue
			}
			if v.HostPath == nil || hostRoot+v.HostPath.Path != m.MountPath {
				t.Errorf("container %s: %s is mounted at %s, want the host path %s", c.Name, v.Name, m.MountPath, strings.TrimPrefix(m.MountPath, hostRoot))
			}
			mounted[v.HostPath.Path] = !m.ReadOnly
		}
	}
	for _, p := range []string{"/etc/containerd", "/usr/local/bin", "/var/lib/cove-node"} {
		if !mounted[p] {
			t.Errorf("container %s: host %s is not mounted writable at %s%s", c.Name, p, hostRoot, p)
		}
	}
}
