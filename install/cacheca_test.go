package install

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/internal/testpki"
)

func cacheCAPath(root string) string { return filepath.Join(root, "etc/cove-node/cache-ca.pem") }

// testCABundle writes a PEM bundle of n self-signed CA certificates to a new file.
func testCABundle(t *testing.T, n int) (string, []byte) {
	t.Helper()
	var bundle []byte
	for i := range n {
		bundle = append(bundle, testpki.NewCA(t, fmt.Sprintf("cove test CA %d", i)).PEM...)
	}
	p := filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, p, string(bundle))
	return p, bundle
}

// --cache-ca: the bundle is installed under the root, ExecStart passes it to cove-node, a
// second run changes nothing, a run without --cache-ca takes it out again, and
// --uninstall restores the sandbox byte for byte, a bundle that was there before included.
func TestInstallCacheCA(t *testing.T) {
	t.Parallel()
	for _, prior := range []bool{false, true} {
		t.Run(fmt.Sprintf("prior file %v", prior), func(t *testing.T) {
			t.Parallel()
			root := t.TempDir()
			writeFile(t, configPath(root), peers.NewContainerdLayout(t).BaseConfig(3))
			if prior {
				writeFile(t, cacheCAPath(root), "someone else's bundle\n")
			}
			before := snapshot(t, root)
			ca, bundle := testCABundle(t, 2)
			args := installArgs(t, root, "https://cove-cache.example:5005", "127.0.0.1:5006", "--cache-ca", ca)

			out := mustRun(t, args...)
			if got := flagValue(execStart(t, root), "--cache-ca"); got != cacheCAPath(root) {
				t.Errorf("ExecStart --cache-ca = %q, want %q\n%s", got, cacheCAPath(root), out)
			}
			if got := readFile(t, cacheCAPath(root)); got != string(bundle) {
				t.Errorf("installed bundle differs from --cache-ca's file:\n%s", got)
			}
			if st, err := os.Stat(cacheCAPath(root)); err != nil || (!prior && st.Mode().Perm() != 0o644) {
				t.Errorf("installed bundle: %v, %v", st, err)
			}
			if prior && !strings.Contains(out, "backed up /etc/cove-node/cache-ca.pem") {
				t.Errorf("the bundle there before was not backed up:\n%s", out)
			}
			verifyUnit(t, root)

			installed := snapshot(t, root)
			if out := mustRun(t, args...); !strings.Contains(out, "nothing to change") {
				t.Errorf("second run:\n%s", out)
			}
			sameTree(t, "second run", installed, snapshot(t, root))

			// Without --cache-ca the bundle goes as --uninstall would take it.
			mustRun(t, installArgs(t, root, "https://cove-cache.example:5005", "127.0.0.1:5006")...)
			if argv := execStart(t, root); slices.Contains(argv, "--cache-ca") {
				t.Errorf("ExecStart still passes --cache-ca: %q", argv)
			}
			if _, err := os.Stat(cacheCAPath(root)); prior == os.IsNotExist(err) {
				t.Errorf("bundle after a run without --cache-ca: %v", err)
			}
			if prior {
				if got := readFile(t, cacheCAPath(root)); got != "someone else's bundle\n" {
					t.Errorf("prior bundle not restored: %q", got)
				}
			}
			mustRun(t, args...)
			sameTree(t, "install again", installed, snapshot(t, root))

			mustRun(t, "--root-dir", root, "--no-restart", "--uninstall")
			sameTree(t, "uninstall", before, snapshot(t, root))
		})
	}
}

// A --cache-ca file that is not a PEM certificate bundle is refused, with the sandbox
// exactly as it was, on a fresh node and over an install made with a good bundle.
func TestCacheCARefusesNonPEM(t *testing.T) {
	t.Parallel()
	good, goodBundle := testCABundle(t, 1)
	body := strings.SplitN(string(goodBundle), "\n", 3)[1] // the first base64 line
	for _, tc := range []struct{ name, content, want string }{
		{"not PEM", "this is not a certificate\n", "not a PEM certificate bundle"},
		{"empty", "", "not a PEM certificate bundle"},
		{"DER", "0\x82\x01\x0a\x02\x82\x01\x01\x00", "not a PEM certificate bundle"},
		{"no END", "-----BEGIN CERTIFICATE-----\n" + body + "\n", "not a PEM certificate bundle"},
		{"not base64", "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n", "not a PEM certificate bundle"},
		{"not a certificate", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid X.509 certificate"},
		{"a key only", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "private key"},
		{"a certificate and its key", string(goodBundle) + "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n", "private key"},
		{"missing file", "", "--cache-ca"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			bad := filepath.Join(t.TempDir(), "ca.pem")
			if tc.name != "missing file" {
				writeFile(t, bad, tc.content)
			}
			if tc.want == "not a valid X.509 certificate" {
				if _, err := exec.LookPath("openssl"); err != nil {
					t.Skip("openssl not installed: the script checks the PEM structure only")
				}
			}
			for _, installedFirst := range []bool{false, true} {
				root := t.TempDir()
				writeFile(t, configPath(root), "version = 3\n")
				if installedFirst {
					mustRun(t, installArgs(t, root, "https://cove-cache.example:5005", "127.0.0.1:5006", "--cache-ca", good)...)
				}
				before := snapshot(t, root)
				out, code := run(t, installArgs(t, root, "https://cove-cache.example:5005", "127.0.0.1:5006", "--cache-ca", bad)...)
				if code == 0 {
					t.Fatalf("exit status 0, want non-zero:\n%s", out)
				}
				if !strings.Contains(out, tc.want) || !strings.Contains(out, "othing was changed") {
					t.Errorf("output does not say %q and that nothing was changed:\n%s", tc.want, out)
				}
				sameTree(t, tc.name, before, snapshot(t, root))
			}
		})
	}
}
