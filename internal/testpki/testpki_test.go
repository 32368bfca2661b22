package testpki

import (
	"crypto/tls"
	"crypto/x509"
	"testing"
)

// A leaf verifies against its CA for 127.0.0.1, and not against another CA.
func TestLeafVerifiesAgainstItsCA(t *testing.T) {
	ca := NewCA(t, "test CA")
	certPEM, keyPEM := ca.Leaf(t, 42)
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if leaf.SerialNumber.Int64() != 42 {
		t.Fatalf("serial %v", leaf.SerialNumber)
	}
	opts := x509.VerifyOptions{Roots: ca.Pool, DNSName: "127.0.0.1"}
	if _, err := leaf.Verify(opts); err != nil {
		t.Fatalf("leaf does not verify against its CA: %v", err)
	}
	opts.Roots = NewCA(t, "other CA").Pool
	if _, err := leaf.Verify(opts); err == nil {
		t.Fatal("leaf verifies against another CA")
	}
}
