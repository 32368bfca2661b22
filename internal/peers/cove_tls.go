package peers

import (
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"testing"
	"time"
)

// StartCoveTLS runs cove-cache serve over HTTPS: certFile and keyFile are passed as
// --tls-cert and --tls-key, readiness is checked with GET https://ADDR/readyz verified
// against roots, and URL is https://Addr. Metric and Restart are not for it (they speak
// plain HTTP with no private roots); read cove-node's metrics instead.
func StartCoveTLS(t testing.TB, storageDir, certFile, keyFile string, roots *x509.CertPool, extra ...string) *Cove {
	t.Helper()
	if storageDir == "" {
		storageDir = t.TempDir()
	}
	client := &http.Client{
		Timeout:   time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}},
	}
	t.Cleanup(client.CloseIdleConnections)
	c := &Cove{StorageDir: storageDir, args: append([]string{"--tls-cert", certFile, "--tls-key", keyFile}, extra...)}
	c.proc, c.Addr, c.LogPath = startOnFreePort(t, "cove-cache", "cove-cache-tls", 10*time.Second, client, "https",
		"/readyz", func(addr string) []string {
			return append([]string{"serve", "--addr", addr, "--storage-dir", c.StorageDir, noDrain}, c.args...)
		})
	c.URL = "https://" + c.Addr
	t.Cleanup(c.Stop)
	return c
}
