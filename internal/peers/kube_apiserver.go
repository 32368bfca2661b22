package peers

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// KubeAPIServer is a running kube-apiserver with its own etcd, both on loopback: the
// real Kubernetes API that EndpointSlice membership (and anything else that talks to
// Kubernetes) is tested against. Authentication is by static token (an admin in
// system:masters) and by ServiceAccount tokens (ServiceAccountConfig); authorization is
// RBAC, as in a real cluster, so least-privilege Roles can be tested. No controllers run:
// what a test needs (EndpointSlices, bindings) it writes itself.
type KubeAPIServer struct {
	// URL is https://127.0.0.1:PORT.
	URL string
	// Dir holds the certificates, keys, token file, logs and etcd's data.
	Dir string
	// CAFile verifies the server's certificate (self-signed by kube-apiserver at start);
	// LogPath is kube-apiserver's output.
	CAFile, LogPath string

	caPEM      []byte
	adminToken string
	etcd       *etcd
	proc       *proc
}

// StartKubeAPIServer starts etcd and kube-apiserver (built by `make tools`) on free
// loopback ports with temporary directories, waits until /readyz answers 200, and stops
// both at cleanup, also when the test fails. The ServiceAccount signing key is made
// here, per server.
func StartKubeAPIServer(t testing.TB) *KubeAPIServer {
	t.Helper()
	etcdBin, apiBin := Bin(t, "etcd"), Bin(t, "kube-apiserver")
	base := t.TempDir()
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		k, err := startKube(t, etcdBin, apiBin, filepath.Join(base, fmt.Sprintf("kube-%d", attempt)))
		if err == nil {
			return k
		}
		lastErr = err
		if !strings.Contains(err.Error(), "address already in use") {
			break
		}
	}
	t.Fatalf("peers: %v", lastErr)
	return nil
}

func startKube(t testing.TB, etcdBin, apiBin, dir string) (*KubeAPIServer, error) {
	if err := os.MkdirAll(filepath.Join(dir, "certs"), 0o700); err != nil {
		return nil, err
	}
	k := &KubeAPIServer{Dir: dir, LogPath: filepath.Join(dir, "kube-apiserver.log"), adminToken: randomHex(24)}
	if err := writeServiceAccountKey(dir); err != nil {
		return nil, err
	}
	// token,user,uid,"groups": the admin is in system:masters, which RBAC lets do anything.
	tokens := fmt.Sprintf("%s,cove-test-admin,cove-test-admin,\"system:masters\"\n", k.adminToken)
	if err := os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(tokens), 0o600); err != nil {
		return nil, err
	}
	e, err := startEtcd(etcdBin, filepath.Join(dir, "etcd"))
	if err != nil {
		return nil, err
	}
	k.etcd = e
	t.Cleanup(e.proc.stop) // registered first, so it runs after kube-apiserver stopped

	port, err := freePort()
	if err != nil {
		return nil, err
	}
	k.URL = fmt.Sprintf("https://127.0.0.1:%d", port)
	certDir := filepath.Join(dir, "certs")
	args := []string{
		"--etcd-servers=" + e.clientURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", port),
		"--cert-dir=" + certDir,
		"--token-auth-file=" + filepath.Join(dir, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + filepath.Join(dir, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(dir, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--enable-priority-and-fairness=false", // fewer moving parts on a small machine
		"--profiling=false",
	}
	p, err := startProc("kube-apiserver", apiBin, args, cleanEnv(), k.LogPath, k.LogPath, 10*time.Second)
	if err != nil {
		return nil, err
	}
	k.proc = p
	t.Cleanup(p.stop)
	k.CAFile = filepath.Join(certDir, "apiserver.crt")
	if err := k.waitReady(90 * time.Second); err != nil {
		p.stop()
		e.proc.stop()
		return nil, fmt.Errorf("kube-apiserver at %s did not become ready: %v\nkube-apiserver log %s (tail):\n%s", k.URL, err, k.LogPath, logTail(k.LogPath, 40))
	}
	return k, nil
}

// writeServiceAccountKey makes the key pair ServiceAccount tokens are signed with.
func writeServiceAccountKey(dir string) error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})
	return errors.Join(os.WriteFile(filepath.Join(dir, "sa.key"), keyPEM, 0o600),
		os.WriteFile(filepath.Join(dir, "sa.pub"), pubPEM, 0o644))
}

// waitReady waits for the self-signed certificate kube-apiserver writes at start, then
// for GET /readyz to answer 200 to the admin over TLS verified against it.
func (k *KubeAPIServer) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for ; time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if done, err := k.proc.exited(); done {
			return fmt.Errorf("exited: %v", err)
		}
		if k.caPEM == nil {
			b, err := os.ReadFile(k.CAFile)
			if err != nil || !strings.Contains(string(b), "END CERTIFICATE") {
				lastErr = fmt.Errorf("no serving certificate yet: %v", err)
				continue
			}
			k.caPEM = b
		}
		lastErr = k.readyz()
		if lastErr == nil {
			return nil
		}
	}
	return fmt.Errorf("not ready after %v: %v", timeout, lastErr)
}

func (k *KubeAPIServer) readyz() error {
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(k.caPEM) {
		return fmt.Errorf("no certificate in %s", k.CAFile)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.URL+"/readyz", nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+k.adminToken)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /readyz: %s", resp.Status)
	}
	return nil
}

// Config is a client configuration for this server that authenticates with the bearer
// token (any token: one from ServiceAccountConfig's user, or a bogus one to see a 401).
func (k *KubeAPIServer) Config(token string) *rest.Config {
	return &rest.Config{
		Host:            k.URL,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: k.caPEM},
		UserAgent:       "cove-test",
	}
}

// AdminConfig is the client configuration of the admin (system:masters).
func (k *KubeAPIServer) AdminConfig() *rest.Config { return k.Config(k.adminToken) }

// AdminClient is a clientset for the admin, for tests that set the cluster up.
func (k *KubeAPIServer) AdminClient(t testing.TB) kubernetes.Interface {
	t.Helper()
	c, err := kubernetes.NewForConfig(k.AdminConfig())
	if err != nil {
		t.Fatalf("peers: kubernetes client: %v", err)
	}
	return c
}

// Stop stops kube-apiserver, then etcd. Idempotent; cleanup calls it too.
func (k *KubeAPIServer) Stop() {
	k.proc.stop()
	k.etcd.proc.stop()
}
