package nodeinstall

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"unicode"

	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// The cove-cache replicas from a Service's EndpointSlices (cove-node serve
// --caches-from-endpointslices, docs/scaleout.md). cove-node runs on the node, outside
// any pod, so it has no in-cluster credentials: it reads the API with a kubeconfig,
// either one already on the node (--kubeconfig) or, when the install runs in the
// DaemonSet's pod, one the install writes (KubeconfigPath) from that pod's environment
// with --kube-token-file, a ServiceAccount token the kubelet keeps current in the pod's
// projected volume, as the node sees it.

// Node paths of the EndpointSlice membership.
const (
	KubeconfigPath = "/etc/cove-node/kubeconfig"
	// DefaultKubeCAFile is where a pod finds its API server's CA.
	DefaultKubeCAFile = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
)

// CheckCachesFrom checks --caches-from-endpointslices NAMESPACE/SERVICE and
// --caches-port-name by the API's own rules, so that a typo fails at once rather than
// as a cache list that stays empty.
func CheckCachesFrom(service, portName string) error {
	namespace, name, ok := strings.Cut(service, "/")
	if !ok || namespace == "" || name == "" || strings.Contains(name, "/") {
		return usagef("--caches-from-endpointslices '%s': want NAMESPACE/SERVICE", service)
	}
	if errs := validation.IsDNS1123Label(namespace); len(errs) > 0 {
		return usagef("--caches-from-endpointslices '%s': namespace: %s", service, errs[0])
	}
	if errs := validation.IsDNS1035Label(name); len(errs) > 0 {
		return usagef("--caches-from-endpointslices '%s': service: %s", service, errs[0])
	}
	if portName != "" {
		if errs := validation.IsValidPortName(portName); len(errs) > 0 {
			return usagef("--caches-port-name '%s': %s", portName, errs[0])
		}
	}
	return nil
}

// validateCachesFrom checks the EndpointSlice options.
func (o *Options) validateCachesFrom() error {
	if o.CachesFrom == "" {
		if o.Kubeconfig != "" || o.KubeTokenFile != "" || o.CachesPortName != "" {
			return usagef("--kubeconfig, --kube-token-file and --caches-port-name need --caches-from-endpointslices")
		}
		return nil
	}
	if err := CheckCachesFrom(o.CachesFrom, o.CachesPortName); err != nil {
		return err
	}
	switch {
	case o.Kubeconfig != "" && o.KubeTokenFile != "":
		return usagef("--kubeconfig and --kube-token-file: give one (a kubeconfig on the node, or a token the install writes one for)")
	case o.Kubeconfig != "":
		var err error
		if o.Kubeconfig, err = CleanPath("--kubeconfig", o.Kubeconfig); err != nil {
			return err
		}
		if st, err := os.Stat(o.File(o.Kubeconfig)); err != nil || !st.Mode().IsRegular() {
			return usagef("--kubeconfig '%s': no file there on the node", o.Kubeconfig)
		}
	case o.KubeTokenFile != "":
		p := o.KubeTokenFile
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || strings.ContainsFunc(p, func(r rune) bool { return unicode.IsControl(r) || unicode.IsSpace(r) }) {
			return usagef("--kube-token-file '%s': want a clean absolute path", p)
		}
		if o.KubeCAFile == "" {
			o.KubeCAFile = DefaultKubeCAFile
		}
	default:
		return usagef("--caches-from-endpointslices needs --kubeconfig (a kubeconfig on the node) or --kube-token-file (from the DaemonSet's pod): cove-node runs outside any pod and has no in-cluster credentials")
	}
	return nil
}

// kubeconfigArg is cove-node's --kubeconfig: the one given, or the one the install writes.
func (o *Options) kubeconfigArg() string {
	if o.Kubeconfig != "" {
		return o.Kubeconfig
	}
	return o.Conf(KubeconfigPath)
}

// podKubeconfig builds the kubeconfig cove-node reads the API with, from the pod the
// install runs in: the API server's address from the variables the kubelet sets, its
// CA from KubeCAFile, and the token file, named as the node sees it.
func (in *installer) podKubeconfig() ([]byte, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, usagef("--kube-token-file: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set: the install is not running in a pod (give --kubeconfig instead)")
	}
	ca, err := os.ReadFile(in.KubeCAFile)
	if err != nil {
		return nil, fmt.Errorf("--kube-ca-file '%s': cannot read it (%v)", in.KubeCAFile, err)
	}
	if _, err := CheckCABundle(ca); err != nil {
		return nil, fmt.Errorf("--kube-ca-file '%s' %v", in.KubeCAFile, err)
	}
	if st, err := os.Stat(in.File(in.KubeTokenFile)); err != nil || !st.Mode().IsRegular() {
		in.warn("--kube-token-file %s: not found on the node (yet): cove-node will use the --cache URLs until it can read it", in.KubeTokenFile)
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["cluster"] = &clientcmdapi.Cluster{Server: "https://" + net.JoinHostPort(host, port), CertificateAuthorityData: ca}
	cfg.AuthInfos["cove-node"] = &clientcmdapi.AuthInfo{TokenFile: in.KubeTokenFile}
	cfg.Contexts["cove-node"] = &clientcmdapi.Context{Cluster: "cluster", AuthInfo: "cove-node"}
	cfg.CurrentContext = "cove-node"
	return clientcmd.Write(*cfg)
}
