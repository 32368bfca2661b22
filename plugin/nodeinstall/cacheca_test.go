package nodeinstall

import (
	"strings"
	"testing"

	"github.com/cove-oci/cove/internal/testpki"
)

func TestCheckCABundle(t *testing.T) {
	a, b := testpki.NewCA(t, "cove test CA a").PEM, testpki.NewCA(t, "cove test CA b").PEM
	if n, err := CheckCABundle(append(append([]byte("# comment before\n"), a...), b...)); err != nil || n != 2 {
		t.Fatalf("a bundle of two: %d, %v", n, err)
	}
	body := strings.SplitN(string(a), "\n", 3)[1]
	for _, tc := range []struct{ name, in, want string }{
		{"not PEM", "this is not a certificate\n", "not a PEM certificate bundle"},
		{"empty", "", "not a PEM certificate bundle"},
		{"no END", "-----BEGIN CERTIFICATE-----\n" + body + "\n", "not a PEM certificate bundle"},
		{"a good one, then one without END", string(a) + "-----BEGIN CERTIFICATE-----\n" + body + "\n", "block 2 does not decode"},
		{"not base64", "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n", "not a PEM certificate bundle"},
		{"not a certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "certificate 1 of 1 is not a valid X.509 certificate"},
		{"a key", string(a) + "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n", "private key"},
		{"a key that does not decode", string(a) + "-----BEGIN PRIVATE KEY-----\n!!\n-----END PRIVATE KEY-----\n", "private key"},
	} {
		if _, err := CheckCABundle([]byte(tc.in)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error saying %q", tc.name, err, tc.want)
		}
	}
}
