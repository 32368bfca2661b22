package cluster

import (
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

const testSelf = "http://10.0.0.1:5005"

func newTestAuth(t *testing.T, secret string, now *time.Time) *PeerAuth {
	t.Helper()
	a, err := NewPeerAuth([]byte(secret), WithNow(func() time.Time { return *now }))
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func signedRequest(t *testing.T, a *PeerAuth) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://10.0.0.2:5005/v2/team/app/blobs/sha256:aa?ns=r.example", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer client-token")
	req.Header.Set("Range", "bytes=100-")
	a.Sign(req, testSelf)
	return req
}

func TestPeerAuthSignVerify(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	a := newTestAuth(t, "0123456789abcdef0123", &now)
	req := signedRequest(t, a)
	peer, err := a.Verify(req)
	if err != nil || peer != testSelf {
		t.Fatalf("Verify = %q, %v", peer, err)
	}
	now = now.Add(29 * time.Second)
	if _, err := a.Verify(req); err != nil {
		t.Fatalf("within the window: %v", err)
	}
}

// Every way of getting a peer request wrong fails verification, with a reason and
// errdefs' permission-denied class.
func TestPeerAuthRefusals(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	a := newTestAuth(t, "0123456789abcdef0123", &now)
	other := newTestAuth(t, "another secret, long enough", &now)
	cases := map[string]func(*http.Request){
		"wrong secret":         func(r *http.Request) { other.Sign(r, testSelf) },
		"replayed (old)":       func(r *http.Request) { now = now.Add(31 * time.Second) },
		"from the future":      func(r *http.Request) { now = now.Add(-31 * time.Second) },
		"other path":           func(r *http.Request) { r.URL.Path = "/v2/team/other/blobs/sha256:aa" },
		"other query":          func(r *http.Request) { r.URL.RawQuery = "ns=evil.example" },
		"other method":         func(r *http.Request) { r.Method = http.MethodHead },
		"other range":          func(r *http.Request) { r.Header.Set("Range", "bytes=0-") },
		"other credential":     func(r *http.Request) { r.Header.Set("Authorization", "Bearer stolen") },
		"credential removed":   func(r *http.Request) { r.Header.Del("Authorization") },
		"other sender":         func(r *http.Request) { r.Header.Set(HeaderPeer, "http://10.0.0.3:5005") },
		"sender not a URL":     func(r *http.Request) { r.Header.Set(HeaderPeer, "replica-1") },
		"time changed":         func(r *http.Request) { r.Header.Set(HeaderTime, "1800000001") },
		"time malformed":       func(r *http.Request) { r.Header.Set(HeaderTime, "soon") },
		"signature missing":    func(r *http.Request) { r.Header.Del(HeaderSignature) },
		"signature empty":      func(r *http.Request) { r.Header.Set(HeaderSignature, ""); r.Header.Set(HeaderPeer, testSelf) },
		"signature truncated":  func(r *http.Request) { s := r.Header.Get(HeaderSignature); r.Header.Set(HeaderSignature, s[:len(s)-1]) },
		"only the peer header": func(r *http.Request) { r.Header.Del(HeaderTime); r.Header.Del(HeaderSignature) },
	}
	for name, spoil := range cases {
		t.Run(name, func(t *testing.T) {
			saved := now
			defer func() { now = saved }()
			req := signedRequest(t, a)
			spoil(req)
			peer, err := a.Verify(req)
			if err == nil {
				t.Fatalf("Verify accepted it (peer %q)", peer)
			}
			if !IsBadPeerAuth(err) || !errdefs.IsPermissionDenied(err) || !IsPeerRequest(req) {
				t.Fatalf("error %v: want ErrBadPeerAuth, permission denied", err)
			}
			if strings.Contains(err.Error(), req.Header.Get(HeaderSignature)) && req.Header.Get(HeaderSignature) != "" {
				t.Fatal("the error holds the signature")
			}
		})
	}
}

func TestPeerAuthNoHeaders(t *testing.T) {
	now := time.Now()
	a := newTestAuth(t, "0123456789abcdef0123", &now)
	req, _ := http.NewRequest(http.MethodGet, "http://x:1/v2/", nil)
	if IsPeerRequest(req) {
		t.Fatal("a plain request is a peer request")
	}
	if _, err := a.Verify(req); !errors.Is(err, ErrNotPeer) || IsBadPeerAuth(err) {
		t.Fatalf("Verify of a plain request: %v, want ErrNotPeer", err)
	}
}

func TestReadSecretFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good")
	os.WriteFile(good, []byte("  a-secret-of-enough-bytes\n"), 0o600)
	b, err := ReadSecretFile(good)
	if err != nil || string(b) != "a-secret-of-enough-bytes" {
		t.Fatalf("ReadSecretFile = %q, %v", b, err)
	}
	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("tiny-secret\n"), 0o600)
	if _, err := ReadSecretFile(short); !errdefs.IsInvalidArgument(err) || strings.Contains(err.Error(), "tiny-secret") {
		t.Fatalf("short secret: %v", err)
	}
	if _, err := ReadSecretFile(filepath.Join(dir, "absent")); err == nil {
		t.Fatal("an absent file gave a secret")
	}
	if _, err := NewPeerAuth([]byte("short")); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("NewPeerAuth of a short secret: %v", err)
	}
}
