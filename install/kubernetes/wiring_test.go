package kubernetes_test

import (
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// The names the manifests and the docs agree on.
const (
	namespace = "cove"
	cacheName = "cove-cache"
	nodeName  = "cove-node"
)

// cmdline is a container's command line: the subcommand and its --name=value flags.
type cmdline struct {
	sub   string
	flags map[string][]string
}

// parseArgs splits args into the subcommand and its flags. Flags must be written
// --name=value (or --name alone for a boolean), so that a value is never mistaken for
// the next flag.
func parseArgs(t *testing.T, who string, args []string) cmdline {
	t.Helper()
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		t.Fatalf("%s: args %q do not start with a subcommand", who, args)
	}
	c := cmdline{sub: args[0], flags: map[string][]string{}}
	for _, a := range args[1:] {
		if !strings.HasPrefix(a, "--") {
			t.Fatalf("%s: argument %q: write flags as --name=value", who, a)
		}
		name, value, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		c.flags[name] = append(c.flags[name], value)
	}
	return c
}

// one returns the single value of flag name, failing when it is absent or repeated.
func (c cmdline) one(t *testing.T, who, name string) string {
	t.Helper()
	v := c.flags[name]
	if len(v) != 1 {
		t.Fatalf("%s: want exactly one --%s, have %q", who, name, v)
	}
	return v[0]
}

// containerPort resolves a probe's or Service's port (a number or a name) on c.
func containerPort(c corev1.Container, p intstr.IntOrString) (corev1.ContainerPort, bool) {
	for _, cp := range c.Ports {
		if (p.Type == intstr.String && cp.Name == p.StrVal) || (p.Type == intstr.Int && cp.ContainerPort == p.IntVal) {
			return cp, true
		}
	}
	return corev1.ContainerPort{}, false
}

// podSelects reports whether selector selects the pods of template.
func podSelects(t *testing.T, selector *metav1.LabelSelector, template corev1.PodTemplateSpec) bool {
	t.Helper()
	sel, err := metav1.LabelSelectorAsSelector(selector)
	if err != nil {
		t.Fatal(err)
	}
	return !sel.Empty() && sel.Matches(labels.Set(template.Labels))
}

// cacheConfig reads the TOML file the cove-cache Deployment is given with --config from
// the ConfigMap mounted at that path.
func cacheConfig(t *testing.T, b *built, pod corev1.PodSpec, c corev1.Container, cl cmdline) map[string]any {
	t.Helper()
	path := cl.one(t, cacheName, "config")
	for _, m := range c.VolumeMounts {
		if !strings.HasPrefix(path, m.MountPath+"/") {
			continue
		}
		for _, v := range pod.Volumes {
			if v.Name != m.Name || v.ConfigMap == nil {
				continue
			}
			cm := get[*corev1.ConfigMap](t, b, "ConfigMap", namespace, v.ConfigMap.Name)
			file := strings.TrimPrefix(path, m.MountPath+"/")
			data, ok := cm.Data[file]
			if !ok {
				t.Fatalf("ConfigMap %s has no %s for --config=%s", cm.Name, file, path)
			}
			var cfg map[string]any
			if err := toml.Unmarshal([]byte(data), &cfg); err != nil {
				t.Fatalf("%s in ConfigMap %s: %v", file, cm.Name, err)
			}
			return cfg
		}
	}
	t.Fatalf("--config=%s is on no ConfigMap volume of the Deployment", path)
	return nil
}

// setting is the value cove-cache runs with for a flag: the command line's, else the
// config file's (the key being the flag with _ for -).
func setting(t *testing.T, cl cmdline, cfg map[string]any, name string) (string, bool) {
	t.Helper()
	if v, ok := cl.flags[name]; ok {
		return v[len(v)-1], true
	}
	if v, ok := cfg[strings.ReplaceAll(name, "-", "_")]; ok {
		return fmt.Sprint(v), true
	}
	return "", false
}

func duration(t *testing.T, name, v string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(v)
	if err != nil {
		t.Fatalf("%s = %q: %v", name, v, err)
	}
	return d
}

// urlPort is the port of an http(s) URL (80/443 when it names none).
func urlPort(t *testing.T, raw string) (host string, port int32) {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		t.Fatalf("%q is not a URL: %v", raw, err)
	}
	p := u.Port()
	if p == "" {
		p = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%q: port %q", raw, p)
	}
	return u.Hostname(), int32(n)
}
