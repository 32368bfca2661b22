package kubernetes_test

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// envFromPodIP reports whether the container's POD_IP comes from status.podIP.
func envFromPodIP(c corev1.Container) bool {
	for _, e := range c.Env {
		if e.Name == "POD_IP" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.podIP" {
			return true
		}
	}
	return false
}

// checkDrainFits: the kubelet's SIGKILL (terminationGracePeriodSeconds after SIGTERM)
// comes after the drain's two phases, and the grace outlasts the readiness probe's
// noticing that /readyz fails.
func checkDrainFits(t *testing.T, dep *appsv1.Deployment, c corev1.Container, cl cmdline, cfg map[string]any) {
	t.Helper()
	graceS, ok1 := setting(t, cl, cfg, "shutdown-grace")
	timeoutS, ok2 := setting(t, cl, cfg, "shutdown-timeout")
	if !ok1 || !ok2 {
		t.Fatal("the manifests must set shutdown-grace and shutdown-timeout (args or config), to match terminationGracePeriodSeconds")
	}
	grace, timeout := duration(t, "shutdown-grace", graceS), duration(t, "shutdown-timeout", timeoutS)
	tgps := dep.Spec.Template.Spec.TerminationGracePeriodSeconds
	if tgps == nil {
		t.Fatal("no terminationGracePeriodSeconds (the default 30 s does not match the drain)")
	}
	kill := time.Duration(*tgps) * time.Second
	if kill < grace+timeout+2*time.Second {
		t.Errorf("terminationGracePeriodSeconds %s < shutdown-grace %s + shutdown-timeout %s + 2 s to exit: the kubelet kills the drain", kill, grace, timeout)
	}
	rp := c.ReadinessProbe
	if rp == nil {
		t.Fatal("no readiness probe")
	}
	noticed := time.Duration(rp.PeriodSeconds*max(rp.FailureThreshold, 1)) * time.Second
	if grace <= noticed {
		t.Errorf("shutdown-grace %s is not longer than the readiness probe takes to notice (%s)", grace, noticed)
	}
}

// checkRestricted: non-root, no privilege escalation, no capabilities, read-only root
// filesystem, and every path cove-cache writes (its storage dir) on a writable volume.
func checkRestricted(t *testing.T, pod corev1.PodSpec, c corev1.Container, cl cmdline, cfg map[string]any) {
	t.Helper()
	psc, sc := pod.SecurityContext, c.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		t.Error("the pod must run as a non-root user (runAsNonRoot, runAsUser)")
	}
	if psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Error("no RuntimeDefault seccomp profile")
	}
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Fatal("the root filesystem must be read-only")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.Capabilities == nil ||
		len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" || len(sc.Capabilities.Add) != 0 {
		t.Error("want allowPrivilegeEscalation false and every capability dropped")
	}
	dir, ok := setting(t, cl, cfg, "storage-dir")
	if !ok {
		t.Fatal("no storage-dir: the default is under $HOME, on the read-only root")
	}
	if !onWritableVolume(pod, c, dir) {
		t.Errorf("storage-dir %s is on no writable volume", dir)
	}
}

// onWritableVolume reports whether path is at or under a read-write mount of an emptyDir
// or a persistent volume.
func onWritableVolume(pod corev1.PodSpec, c corev1.Container, path string) bool {
	path = filepath.Clean(path)
	for _, m := range c.VolumeMounts {
		if m.ReadOnly || (path != m.MountPath && !strings.HasPrefix(path, m.MountPath+"/")) {
			continue
		}
		for _, v := range pod.Volumes {
			if v.Name == m.Name && (v.EmptyDir != nil || v.PersistentVolumeClaim != nil || v.Ephemeral != nil) {
				return true
			}
		}
	}
	return false
}
