package kubernetes_test

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/cove-oci/cove/internal/peers"
)

// helpFlag is a flag line of Go's flag.PrintDefaults: "  -name [type]".
var helpFlag = regexp.MustCompile(`(?m)^  -([A-Za-z0-9][A-Za-z0-9._-]*)`)

// flagSet returns the flags `BINARY SUB -h` lists, building the binary from this checkout.
func flagSet(t *testing.T, binary, sub string) map[string]bool {
	t.Helper()
	out, _ := exec.Command(peers.CoveBinary(t, binary), sub, "-h").CombinedOutput()
	names := map[string]bool{}
	for _, m := range helpFlag.FindAllStringSubmatch(string(out), -1) {
		names[m[1]] = true
	}
	if len(names) == 0 {
		t.Errorf("%s has no subcommand %q with flags:\n%s", binary, sub, firstLines(string(out), 4))
		return nil
	}
	return names
}

func firstLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	return strings.Join(lines[:min(n, len(lines))], "\n")
}

// commandLine is one program invocation in the manifests.
type commandLine struct {
	where string   // which object and container
	argv  []string // command then args
}

// commandLines gathers every cove invocation: containers, init containers, exec hooks
// and exec probes (other programs, such as sleep, are left out).
func commandLines(b *built, t *testing.T) []commandLine {
	var out []commandLine
	add := func(kind, name string, pod corev1.PodSpec) {
		for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
			where := fmt.Sprintf("%s %s, container %s", kind, name, c.Name)
			lines := []commandLine{{where, append(slices.Clone(c.Command), c.Args...)}}
			if c.Lifecycle != nil {
				for hook, h := range map[string]*corev1.LifecycleHandler{"preStop": c.Lifecycle.PreStop, "postStart": c.Lifecycle.PostStart} {
					if h != nil && h.Exec != nil {
						lines = append(lines, commandLine{where + " " + hook, h.Exec.Command})
					}
				}
			}
			for probe, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe, "startup": c.StartupProbe} {
				if p != nil && p.Exec != nil {
					lines = append(lines, commandLine{where + " " + probe + " probe", p.Exec.Command})
				}
			}
			for _, l := range lines {
				if len(l.argv) > 0 && strings.HasPrefix(filepath.Base(l.argv[0]), "cove-") {
					out = append(out, l)
				}
			}
		}
	}
	dep := get[*appsv1.Deployment](t, b, "Deployment", namespace, cacheName)
	add("Deployment", dep.Name, dep.Spec.Template.Spec)
	ds := get[*appsv1.DaemonSet](t, b, "DaemonSet", namespace, nodeName)
	add("DaemonSet", ds.Name, ds.Spec.Template.Spec)
	return out
}

// TestManifestFlagsExist: every flag the manifests pass, and every key of cove-cache's
// config file, is one the binary of this checkout has (its own -h says so).
func TestManifestFlagsExist(t *testing.T) {
	b := build(t, dir())
	lines := commandLines(b, t)
	if len(lines) < 4 {
		t.Fatalf("found %d cove command lines, want cove-cache serve, cove-node install, doctor and uninstall", len(lines))
	}
	seen := map[string]bool{}
	for _, cl := range lines {
		if len(cl.argv) < 2 {
			t.Errorf("%s: command %q names no subcommand", cl.where, cl.argv)
			continue
		}
		binary := filepath.Base(cl.argv[0])
		if binary != "cove-cache" && binary != "cove-node" {
			t.Errorf("%s: runs %q, not a cove binary", cl.where, cl.argv[0])
			continue
		}
		args := parseArgs(t, cl.where, cl.argv[1:])
		seen[binary+" "+args.sub] = true
		known := flagSet(t, binary, args.sub)
		if known == nil {
			continue
		}
		for name := range args.flags {
			if !known[name] {
				t.Errorf("%s: %s %s has no flag --%s", cl.where, binary, args.sub, name)
			}
		}
		if binary == "cove-cache" && args.sub == "serve" {
			dep := get[*appsv1.Deployment](t, b, "Deployment", namespace, cacheName)
			cfg := cacheConfig(t, b, dep.Spec.Template.Spec, dep.Spec.Template.Spec.Containers[0], args)
			for k := range cfg {
				if !known[strings.ReplaceAll(k, "_", "-")] {
					t.Errorf("config.toml key %q is no flag of cove-cache serve", k)
				}
			}
		}
	}
	for _, want := range []string{"cove-cache serve", "cove-node install", "cove-node doctor", "cove-node uninstall"} {
		if !seen[want] {
			t.Errorf("the manifests never run %s", want)
		}
	}
}

// TestManifestFlagCheckCatchesTypos: the attack on the check above, on the real help.
func TestManifestFlagCheckCatchesTypos(t *testing.T) {
	known := flagSet(t, "cove-cache", "serve")
	if !known["addr"] || !known["config"] || known["adr"] || known["-addr"] {
		t.Fatalf("cove-cache serve -h parsed as %v", known)
	}
}
