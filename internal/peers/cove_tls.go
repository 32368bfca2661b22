package peers

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
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
	bin := CoveBinary(t, "cove-cache")
	logDir := t.TempDir()
	client := &http.Client{
		Timeout:   time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}},
	}
	t.Cleanup(client.CloseIdleConnections)
	c := &Cove{StorageDir: storageDir, args: append([]string{"--tls-cert", certFile, "--tls-key", keyFile}, extra...)}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatalf("peers: %v", err)
		}
		addr := "127.0.0.1:" + strconv.Itoa(port)
		logPath := filepath.Join(logDir, fmt.Sprintf("cove-cache-tls-%d.log", attempt))
		args := append([]string{"serve", "--addr", addr, "--storage-dir", c.StorageDir}, c.args...)
		p, err := startProc("cove-cache", bin, args, cleanEnv(), logPath, logPath, 10*time.Second)
		if err != nil {
			t.Fatalf("peers: start cove-cache: %v", err)
		}
		if err := waitHTTPS(p, client, "https://"+addr+"/readyz", 10*time.Second); err != nil {
			p.stop()
			lastErr = fmt.Errorf("cove-cache (TLS) did not become ready: %v\n%s", err, logTail(logPath, 30))
			if strings.Contains(logTail(logPath, 5), "address already in use") {
				continue
			}
			break
		}
		c.Addr, c.URL, c.LogPath, c.proc = addr, "https://"+addr, logPath, p
		t.Cleanup(c.Stop)
		return c
	}
	t.Fatalf("peers: %v", lastErr)
	return nil
}

func waitHTTPS(p *proc, client *http.Client, url string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		if done, err := p.exited(); done {
			return fmt.Errorf("exited: %v", err)
		}
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		lastErr = err
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("not ready after %v: %v", timeout, lastErr)
}
