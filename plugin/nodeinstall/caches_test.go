package nodeinstall

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"k8s.io/client-go/tools/clientcmd"

	"github.com/cove-oci/cove/internal/testpki"
)

func TestValidateCachesFromRefusesBadOptions(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "cove-node")
	os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755)
	good := func() *Options {
		return &Options{NoRestart: true, Binary: bin, Caches: []string{"http://127.0.0.1:5005"}, Roots: Roots{RootDir: t.TempDir()},
			CachesFrom: "cove/cove-cache", KubeTokenFile: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~projected/t/token"}
	}
	for _, tc := range []struct {
		name   string
		change func(o *Options)
		want   string
	}{
		{"no NAMESPACE/", func(o *Options) { o.CachesFrom = "cove-cache" }, "NAMESPACE/SERVICE"},
		{"namespace upper-case", func(o *Options) { o.CachesFrom = "Cove/cove-cache" }, "namespace"},
		{"service with _", func(o *Options) { o.CachesFrom = "cove/cove_cache" }, "service"},
		{"port name", func(o *Options) { o.CachesPortName = "no spaces" }, "--caches-port-name"},
		{"no credentials", func(o *Options) { o.KubeTokenFile = "" }, "needs --kubeconfig"},
		{"both credentials", func(o *Options) { o.Kubeconfig = "/etc/kubeconfig" }, "give one"},
		{"kubeconfig not on the node", func(o *Options) { o.KubeTokenFile, o.Kubeconfig = "", "/etc/nope/kubeconfig" }, "no file there"},
		{"relative token file", func(o *Options) { o.KubeTokenFile = "token" }, "--kube-token-file"},
		{"token file with ..", func(o *Options) { o.KubeTokenFile = "/var/../token" }, "--kube-token-file"},
		{"token file with a space", func(o *Options) { o.KubeTokenFile = "/var/my token" }, "--kube-token-file"},
		{"kubeconfig without the Service", func(o *Options) { o.CachesFrom, o.KubeTokenFile = "", ""; o.Kubeconfig = "/k" }, "need --caches-from-endpointslices"},
	} {
		o := good()
		tc.change(o)
		err := o.Validate()
		var ue *UsageError
		if err == nil || !errors.As(err, &ue) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want a usage error saying %q", tc.name, err, tc.want)
		}
	}
	if err := good().Validate(); err != nil {
		t.Errorf("good options: %v", err)
	}
}

// In the DaemonSet's pod: the install writes a kubeconfig naming the API server the pod
// sees, its CA and the pod's token file as the node sees it, and the unit runs cove-node
// with it; a second install changes nothing; uninstall leaves the node as it was.
func TestHostRootInstallPodKubeconfig(t *testing.T) {
	host := hostRootWithContainerd(t)
	write(t, filepath.Join(host, "etc/containerd/config.toml"), "version = 3\n")
	tokenFile := "/var/lib/kubelet/pods/0f0e/volumes/kubernetes.io~projected/cove-node-token/token"
	write(t, filepath.Join(host, tokenFile), "a-token")
	before := tree(t, host)
	ca := testpki.NewCA(t, "cove test kube CA").PEM
	caFile := filepath.Join(t.TempDir(), "ca.crt")
	write(t, caFile, string(ca))
	t.Setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
	t.Setenv("KUBERNETES_SERVICE_PORT", "443")

	o := sandboxOptions(t, t.TempDir())
	o.RootDir, o.HostRoot, o.ContainerdBin = "", host, ""
	o.CachesFrom, o.KubeTokenFile, o.KubeCAFile = "cove/cove-cache", tokenFile, caFile
	var out bytes.Buffer
	o.Out, o.Err = &out, &out
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	if _, err := Install(context.Background(), o); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	unit, _ := os.ReadFile(filepath.Join(host, UnitPath))
	if !strings.Contains(string(unit), " --caches-from-endpointslices cove/cove-cache --kubeconfig "+KubeconfigPath+" ") {
		t.Errorf("unit:\n%s", unit)
	}
	kc := filepath.Join(host, KubeconfigPath)
	if st, err := os.Stat(kc); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("kubeconfig: %v %v", st, err)
	}
	// The token file is a node path: read the kubeconfig as written, not through it.
	kcfg, err := clientcmd.LoadFromFile(kc)
	if err != nil {
		t.Fatal(err)
	}
	cur := kcfg.Contexts[kcfg.CurrentContext]
	if cur == nil || kcfg.Clusters[cur.Cluster] == nil || kcfg.AuthInfos[cur.AuthInfo] == nil {
		t.Fatalf("kubeconfig without a complete current context:\n%+v", kcfg)
	}
	cl, ai := kcfg.Clusters[cur.Cluster], kcfg.AuthInfos[cur.AuthInfo]
	if cl.Server != "https://10.96.0.1:443" || !bytes.Equal(cl.CertificateAuthorityData, ca) || ai.TokenFile != tokenFile || ai.Token != "" {
		t.Errorf("kubeconfig gives server %q, CA %v, token file %q, token %q", cl.Server, bytes.Equal(cl.CertificateAuthorityData, ca), ai.TokenFile, ai.Token)
	}
	installed := tree(t, host)
	if res, err := Install(context.Background(), o); err != nil || res.Changed {
		t.Fatalf("second install: %+v, %v\n%s", res, err, out.String())
	}
	if !reflect.DeepEqual(installed, tree(t, host)) {
		t.Error("the second install changed files")
	}
	if err := Uninstall(context.Background(), &UninstallOptions{Roots: Roots{HostRoot: host}, NoRestart: true, Out: &out, Err: &out}); err != nil {
		t.Fatal(err)
	}
	if after := tree(t, host); !reflect.DeepEqual(before, after) {
		t.Errorf("uninstall: the host root is not as it was")
	}
}

// Outside a pod, --kube-token-file is refused before anything changes.
func TestInstallPodKubeconfigNeedsAPod(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "etc/containerd/config.toml"), "version = 3\n")
	before := tree(t, root)
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	o := sandboxOptions(t, root)
	o.CachesFrom, o.KubeTokenFile = "cove/cove-cache", "/var/lib/kubelet/pods/u/token"
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	_, err := Install(context.Background(), o)
	if err == nil || !strings.Contains(err.Error(), "not running in a pod") {
		t.Fatalf("Install outside a pod: %v", err)
	}
	if after := tree(t, root); !reflect.DeepEqual(before, after) {
		t.Errorf("the sandbox changed")
	}
}
