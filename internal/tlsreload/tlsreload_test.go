package tlsreload

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/testpki"
)

// pair is a PEM certificate and key for 127.0.0.1 signed by a test CA.
type pair struct {
	cert, key []byte
	serial    *big.Int
}

// leaf issues a pair signed by ca (see testpki.CA.Leaf).
func leaf(t *testing.T, ca *testpki.CA, serial int64) pair {
	t.Helper()
	cert, key := ca.Leaf(t, serial)
	return pair{cert: cert, key: key, serial: big.NewInt(serial)}
}

func write(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// replace writes b to a temporary file beside path and renames it over path.
func replace(t *testing.T, path string, b []byte) {
	t.Helper()
	tmp := path + ".tmp"
	write(t, tmp, b)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// serve runs a TLS listener on the reloader and returns its address.
func serve(t *testing.T, r *Reloader) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", r.ServerConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.(*tls.Conn).Handshake()
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// servedSerial makes a new TLS connection, verifying against the CA, and returns the
// serial number of the certificate the server presented.
func servedSerial(t *testing.T, addr string, pool *x509.CertPool) *big.Int {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: pool})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber
}

func quietLogger(buf *bytes.Buffer) *slog.Logger {
	var mu sync.Mutex
	return slog.New(slog.NewTextHandler(lockedWriter{&mu, buf}, nil))
}

type lockedWriter struct {
	mu  *sync.Mutex
	buf *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.Write(p)
}

func setup(t *testing.T, opts ...Option) (ca *testpki.CA, dir, certFile, keyFile string, r *Reloader, addr string, logs *bytes.Buffer) {
	t.Helper()
	ca = testpki.NewCA(t, "tlsreload test CA")
	dir = t.TempDir()
	certFile, keyFile = filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	p := leaf(t, ca, 1001)
	write(t, certFile, p.cert)
	write(t, keyFile, p.key)
	logs = &bytes.Buffer{}
	r, err := New(certFile, keyFile, append([]Option{WithCheckInterval(0), WithLogger(quietLogger(logs))}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	addr = serve(t, r)
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1001 {
		t.Fatalf("serial %v, want 1001", got)
	}
	return
}

func TestRotateInPlace(t *testing.T) {
	ca, _, certFile, keyFile, _, addr, _ := setup(t)
	p := leaf(t, ca, 1002)
	write(t, certFile, p.cert)
	write(t, keyFile, p.key)
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1002 {
		t.Fatalf("after rotation: serial %v, want 1002", got)
	}
}

func TestRotateByRename(t *testing.T) {
	ca, _, certFile, keyFile, _, addr, _ := setup(t)
	p := leaf(t, ca, 1002)
	replace(t, keyFile, p.key)
	replace(t, certFile, p.cert)
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1002 {
		t.Fatalf("after rename: serial %v, want 1002", got)
	}
}

// The way a Kubernetes secret volume updates: tls.crt -> ..data/tls.crt, ..data ->
// ..TIMESTAMP, and an update renames a new ..data symlink over the old one.
func TestRotateSecretVolumeSymlinkSwap(t *testing.T) {
	ca := testpki.NewCA(t, "tlsreload test CA")
	dir := t.TempDir()
	mkver := func(name string, p pair) {
		d := filepath.Join(dir, name)
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		write(t, filepath.Join(d, "tls.crt"), p.cert)
		write(t, filepath.Join(d, "tls.key"), p.key)
	}
	mkver("..v1", leaf(t, ca, 1001))
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.Symlink("..v1", filepath.Join(dir, "..data")))
	must(os.Symlink("..data/tls.crt", filepath.Join(dir, "tls.crt")))
	must(os.Symlink("..data/tls.key", filepath.Join(dir, "tls.key")))
	r, err := New(filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key"), WithCheckInterval(0), WithLogger(quietLogger(&bytes.Buffer{})))
	must(err)
	addr := serve(t, r)
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1001 {
		t.Fatalf("serial %v, want 1001", got)
	}
	mkver("..v2", leaf(t, ca, 1002))
	must(os.Symlink("..v2", filepath.Join(dir, "..data_tmp")))
	must(os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")))
	must(os.RemoveAll(filepath.Join(dir, "..v1")))
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1002 {
		t.Fatalf("after the symlink swap: serial %v, want 1002", got)
	}
}

func TestBadPairKeepsOld(t *testing.T) {
	ca, _, certFile, keyFile, r, addr, logs := setup(t)
	p2, p3 := leaf(t, ca, 1002), leaf(t, ca, 1003)
	// A certificate whose key is another's.
	write(t, certFile, p2.cert)
	write(t, keyFile, p3.key)
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1001 {
		t.Fatalf("mismatched pair: serial %v, want the old 1001", got)
	}
	if !strings.Contains(logs.String(), "TLS certificate reload failed") {
		t.Fatalf("no error logged:\n%s", logs.String())
	}
	// Garbage.
	write(t, certFile, []byte("not a certificate"))
	if err := r.Check(); err == nil {
		t.Fatal("Check of a garbage certificate: no error")
	}
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1001 {
		t.Fatalf("garbage: serial %v, want the old 1001", got)
	}
	// A missing file.
	if err := os.Remove(keyFile); err != nil {
		t.Fatal(err)
	}
	if err := r.Check(); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Check with the key gone: %v, want not-exist", err)
	}
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1001 {
		t.Fatalf("key missing: serial %v, want the old 1001", got)
	}
	// Fixed: picked up.
	write(t, certFile, p3.cert)
	write(t, keyFile, p3.key)
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1003 {
		t.Fatalf("after the fix: serial %v, want 1003", got)
	}
}

// A writer that has written the certificate but only half of it, then the key, then the
// rest: every handshake in between gets the old certificate, the end the new one.
func TestPartialWrite(t *testing.T) {
	ca, _, certFile, keyFile, _, addr, _ := setup(t)
	p := leaf(t, ca, 1002)
	write(t, certFile, p.cert[:len(p.cert)/2])
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1001 {
		t.Fatalf("half a certificate: serial %v, want 1001", got)
	}
	write(t, certFile, p.cert)
	// The certificate is whole but the key is still the old one: a mismatch.
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1001 {
		t.Fatalf("new certificate, old key: serial %v, want 1001", got)
	}
	write(t, keyFile, p.key[:len(p.key)/3])
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1001 {
		t.Fatalf("partial key: serial %v, want 1001", got)
	}
	write(t, keyFile, p.key)
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1002 {
		t.Fatalf("whole pair: serial %v, want 1002", got)
	}
}

// Handshakes look at the files at most once per interval.
func TestCheckInterval(t *testing.T) {
	ca, _, certFile, keyFile, r, addr, _ := setup(t)
	now := time.Now()
	var mu sync.Mutex
	r.mu.Lock()
	r.interval = time.Minute
	r.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	r.lastCheck = now
	r.mu.Unlock()
	p := leaf(t, ca, 1002)
	write(t, certFile, p.cert)
	write(t, keyFile, p.key)
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1001 {
		t.Fatalf("within the interval: serial %v, want 1001 (not checked yet)", got)
	}
	mu.Lock()
	now = now.Add(time.Minute)
	mu.Unlock()
	if got := servedSerial(t, addr, ca.Pool); got.Int64() != 1002 {
		t.Fatalf("after the interval: serial %v, want 1002", got)
	}
}

// Many handshakes during many rotations (run with -race): each gets a whole certificate.
func TestConcurrentRotation(t *testing.T) {
	ca, _, certFile, keyFile, _, addr, _ := setup(t)
	pairs := []pair{leaf(t, ca, 2001), leaf(t, ca, 2002), leaf(t, ca, 2003)}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.Pool})
				if err != nil {
					t.Error(err)
					return
				}
				c.Close()
			}
		}()
	}
	for i := range 30 {
		p := pairs[i%len(pairs)]
		replace(t, keyFile, p.key)
		replace(t, certFile, p.cert)
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	last := pairs[29%len(pairs)]
	if got := servedSerial(t, addr, ca.Pool); got.Cmp(last.serial) != 0 {
		t.Fatalf("serial %v, want %v", got, last.serial)
	}
}

func TestNewFailsClearly(t *testing.T) {
	ca := testpki.NewCA(t, "tlsreload test CA")
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	if _, err := New(certFile, keyFile); err == nil || !strings.Contains(err.Error(), "tls.crt") {
		t.Fatalf("missing files: %v", err)
	}
	p, q := leaf(t, ca, 1), leaf(t, ca, 2)
	write(t, certFile, p.cert)
	write(t, keyFile, q.key)
	if _, err := New(certFile, keyFile); err == nil || !strings.Contains(err.Error(), "loading TLS certificate") {
		t.Fatalf("mismatched pair: %v", err)
	}
	if _, err := New(certFile, ""); err == nil {
		t.Fatal("no key file: no error")
	}
}

func TestMinimumTLS12(t *testing.T) {
	ca, _, _, _, _, addr, _ := setup(t)
	_, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.Pool, MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11})
	if err == nil {
		t.Fatal("a TLS 1.1 handshake succeeded")
	}
	c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: ca.Pool, MaxVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatalf("TLS 1.2: %v", err)
	}
	c.Close()
}
