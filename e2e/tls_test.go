package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/internal/testpki"
)

// writeAtomic writes b beside path and renames it over path, as a secret update would.
func writeAtomic(t *testing.T, path string, b []byte) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// servedSerial is the serial number of the certificate a new TLS connection to addr
// gets, verified against pool.
func servedSerial(t *testing.T, addr string, pool *x509.CertPool) int64 {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatalf("tls.Dial %s: %v", addr, err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
}

func nodeFallbacks(t *testing.T, n *peers.CoveNode) float64 {
	t.Helper()
	return n.Metric(t, "cove_node_requests_total", `served_by="origin"`) +
		n.Metric(t, "cove_node_requests_total", `served_by="handoff"`)
}

// containerd -> cove-node -> HTTPS -> cove-cache -> origin, with the certificate rotated
// under the running cove-cache, and a cove-node that does not trust it falling back.
func TestTLSCacheWithRotation(t *testing.T) {
	ctx := testCtx(t)
	dir := t.TempDir()
	ca := testpki.NewCA(t, "cove test CA")
	caFile := filepath.Join(dir, "ca.pem")
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if err := os.WriteFile(caFile, ca.PEM, 0o600); err != nil {
		t.Fatal(err)
	}
	cert1, key1 := ca.Leaf(t, 1001)
	cert2, key2 := ca.Leaf(t, 1002)
	writeAtomic(t, certFile, cert1)
	writeAtomic(t, keyFile, key1)

	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 2, 1<<20)
	img2 := peers.PushRandomImage(t, origin.Addr, "team/app:v2", 2, 1<<20)
	cove := peers.StartCoveTLS(t, "", certFile, keyFile, ca.Pool, "--origin-plain-http", origin.Addr)
	if got := servedSerial(t, cove.Addr, ca.Pool); got != 1001 {
		t.Fatalf("serial %d, want 1001", got)
	}
	// Plain HTTP to the TLS port gets nowhere.
	if resp, err := http.Get("http://" + cove.Addr + "/readyz"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Fatal("plain HTTP answered 200 on the TLS port")
		}
	}

	node := peers.StartCoveNode(t, []string{cove.URL}, "--cache-ca", caFile, "--origin-plain-http", origin.Addr)
	a := peers.StartContainerd(t, peers.WithMirror(node.URL))
	if err := a.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, a, img)
	viaCache := node.Metric(t, "cove_node_requests_total", `served_by="cache"`)
	if viaCache == 0 {
		t.Fatal("nothing was served by the cache over TLS")
	}
	if f := nodeFallbacks(t, node); f != 0 {
		t.Fatalf("%v requests fell back with a healthy TLS cache", f)
	}

	// Rotate: the key and then the certificate renamed into place under the running
	// cove-cache. In between, the pair does not match; the old certificate stays.
	writeAtomic(t, keyFile, key2)
	writeAtomic(t, certFile, cert2)
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := servedSerial(t, cove.Addr, ca.Pool)
		if got == 1002 {
			break
		}
		if got != 1001 || time.Now().After(deadline) {
			t.Fatalf("after rotation: serial %d, want 1002", got)
		}
		time.Sleep(100 * time.Millisecond)
	}
	reloaded := false
	for _, l := range cove.Logs(t) {
		if l["msg"] == "TLS certificate reloaded" && l["serial"] == "1002" {
			reloaded = true
		}
	}
	if !reloaded {
		t.Error("cove-cache did not log the reload of serial 1002")
	}

	// A second pull through the same cove-node, and a pull through a new one whose every
	// connection meets the new certificate: both through the cache.
	if err := a.Pull(ctx, img2.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, a, img2)
	if n := node.Metric(t, "cove_node_requests_total", `served_by="cache"`); n <= viaCache {
		t.Fatalf("second pull: served by cache %v, was %v", n, viaCache)
	}
	if f := nodeFallbacks(t, node); f != 0 {
		t.Fatalf("%v requests fell back after the rotation", f)
	}
	fresh := peers.StartCoveNode(t, []string{cove.URL}, "--cache-ca", caFile, "--origin-plain-http", origin.Addr)
	b := peers.StartContainerd(t, peers.WithMirror(fresh.URL))
	if err := b.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, b, img)
	if n := fresh.Metric(t, "cove_node_requests_total", `served_by="cache"`); n == 0 {
		t.Fatal("fresh node: nothing served by the cache with the rotated certificate")
	}
	if f := nodeFallbacks(t, fresh); f != 0 {
		t.Fatalf("fresh node: %v requests fell back", f)
	}
	for _, d := range allBlobs(img) {
		if n := origin.BlobGETs()[d]; n != 1 {
			t.Errorf("origin GETs of %s = %d, want 1", d, n)
		}
	}

	// A cove-node that trusts another CA cannot verify cove-cache: it hands off, and the
	// pull still succeeds from the origin.
	other := testpki.NewCA(t, "some other CA")
	otherFile := filepath.Join(dir, "other-ca.pem")
	if err := os.WriteFile(otherFile, other.PEM, 0o600); err != nil {
		t.Fatal(err)
	}
	wrong := peers.StartCoveNode(t, []string{cove.URL}, "--cache-ca", otherFile, "--origin-plain-http", origin.Addr)
	c := peers.StartContainerd(t, peers.WithMirror(wrong.URL))
	if err := c.Pull(ctx, img.Ref); err != nil {
		t.Fatal(err)
	}
	peers.CheckPulled(t, ctx, c, img)
	if n := wrong.Metric(t, "cove_node_requests_total", `served_by="cache"`); n != 0 {
		t.Fatalf("a node with the wrong CA was served %v requests by the cache", n)
	}
	if f := nodeFallbacks(t, wrong); f == 0 {
		t.Fatal("a node with the wrong CA did not fall back")
	}
	if b, err := os.ReadFile(wrong.LogPath); err != nil || !strings.Contains(string(b), "certificate") {
		t.Errorf("the wrong-CA node's log does not name the certificate problem:\n%s", b)
	}
}
