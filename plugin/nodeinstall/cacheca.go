package nodeinstall

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"strings"
)

// CheckCABundle checks that b is a PEM bundle of CA certificates as cove-node reads it: at
// least one CERTIFICATE block, each an X.509 certificate, nothing that fails to decode, and
// no private key (the bundle is installed world-readable). It returns how many there are.
func CheckCABundle(b []byte) (int, error) {
	if bytes.Contains(b, []byte("PRIVATE KEY-----")) {
		return 0, fmt.Errorf("holds a private key: give the CA certificates only (the bundle is installed world-readable)")
	}
	var certs []*pem.Block
	rest := b
	for {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if strings.HasSuffix(blk.Type, "PRIVATE KEY") {
			return 0, fmt.Errorf("holds a private key: give the CA certificates only (the bundle is installed world-readable)")
		}
		if blk.Type == "CERTIFICATE" {
			certs = append(certs, blk)
		}
	}
	if bytes.Contains(rest, []byte("-----BEGIN")) {
		return 0, fmt.Errorf("is not a PEM certificate bundle (block %d does not decode: a missing END line, or what is between is not base64)", len(certs)+1)
	}
	if len(certs) == 0 {
		return 0, fmt.Errorf("is not a PEM certificate bundle (no -----BEGIN CERTIFICATE----- block)")
	}
	for i, c := range certs {
		if _, err := x509.ParseCertificate(c.Bytes); err != nil {
			return 0, fmt.Errorf("certificate %d of %d is not a valid X.509 certificate (%v)", i+1, len(certs), err)
		}
	}
	return len(certs), nil
}

// readCABundle reads and checks --cache-ca.
func readCABundle(path string) ([]byte, int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, 0, fmt.Errorf("--cache-ca '%s': cannot read it (%v)", path, err)
	}
	n, err := CheckCABundle(b)
	if err != nil {
		return nil, 0, fmt.Errorf("--cache-ca '%s' %v", path, err)
	}
	return b, n, nil
}
