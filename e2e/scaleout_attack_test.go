package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
)

// An attacker on the cluster network calls the replicas' peer path directly, for a
// private repository's blob (cached, and not cached) of a token-authenticated origin:
// without the secret, with a wrong one, replaying a signature made two minutes ago,
// moving a genuine signature onto another credential, and, holding a genuine signature
// (as if the secret leaked), without the client's credential or with another tenant's.
// The first four are refused with 403 and counted; the last two get the origin's own
// answer (401 with its challenge), never the blob, and the uncached blob is not fetched.
// The owner also decides again for a plain client asking a non-owner replica: an
// anonymous client gets the origin's 401 relayed, alice her blob. No replica logs the
// secret or a signature.
func TestScaleOutPeerPathAttacks(t *testing.T) {
	ctx := testCtx(t)
	origin := peers.StartTokenOrigin(t, map[string]string{"alice": "alice-pw", "bob": "bob-pw"})
	img := origin.Push(t, "alice/app:v1", 2, 1<<20)
	cached, uncached := img.Layers[0], img.Layers[1]
	m, cr := startScaleOut(t, 3, origin.Addr)
	urls := replicaURLs(cr)
	blobURL := func(c *peers.Cove, d string) string {
		return c.URL + "/v2/alice/app/blobs/" + d + "?ns=" + origin.Addr
	}
	token := func(user string, repo string) string {
		resp, err := http.Get(origin.URL + "/v2/" + repo + "/blobs/" + cached)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		tok, err := peers.FetchToken(resp.Header.Get("Www-Authenticate"), user, origin.Passwords[user])
		if err != nil {
			t.Fatalf("token for %s: %v", user, err)
		}
		return "Bearer " + tok
	}
	alice, bob := token("alice", "alice/app"), token("bob", "bob/app")

	// alice pulls the cached blob through its owner's neighbour: forwarded, filled, stored.
	owner := cluster.Owner(urls, cached)
	var asker *peers.Cove
	for _, c := range cr.Replicas {
		if c.URL != owner {
			asker = c
		}
	}
	if got := blobDigestOf(t, blobURL(asker, cached), alice); got != cached {
		t.Fatalf("alice's GET through a non-owner: %s", got)
	}
	waitObjects(t, ctx, m, []string{cached})
	if asker.Metric(t, "cove_peer_forwarded_total", `to="owner"`) == 0 {
		t.Fatal("alice's miss was not forwarded to its owner")
	}
	// An anonymous client through a non-owner, for the uncached blob: the owner's (the
	// origin's) 401, relayed with the origin's challenge.
	uncachedAsker := cr.Replicas[0]
	if uncachedAsker.URL == cluster.Owner(urls, uncached) {
		uncachedAsker = cr.Replicas[1]
	}
	status, hdr, body := get(t, blobURL(uncachedAsker, uncached), "", nil)
	if status != http.StatusUnauthorized || !strings.Contains(hdr.Get("Www-Authenticate"), origin.Tokens.Realm) || isBlob(body, uncached) {
		t.Errorf("anonymous GET through a non-owner: %d, challenge %q", status, hdr.Get("Www-Authenticate"))
	}

	secret := cr.Secret
	var signatures []string
	for _, target := range cr.Replicas {
		for _, d := range []string{cached, uncached} {
			u := blobURL(target, d)
			sign := func(key []byte, at time.Time, auth string) http.Header {
				a, err := cluster.NewPeerAuth(key, cluster.WithNow(func() time.Time { return at }))
				if err != nil {
					t.Fatal(err)
				}
				h := signedHeader(a, u, auth, urls[1])
				signatures = append(signatures, h.Get(cluster.HeaderSignature))
				return h
			}
			refused := map[string]struct {
				auth string
				h    http.Header
			}{
				"peer header, no signature":            {alice, http.Header{cluster.HeaderPeer: {urls[1]}}},
				"wrong secret":                         {alice, sign([]byte("a guessed secret, 32 bytes long."), time.Now(), alice)},
				"replayed old signature":               {alice, sign(secret, time.Now().Add(-2*time.Minute), alice)},
				"signature of bob, alice's credential": {alice, sign(secret, time.Now(), bob)},
			}
			for name, tc := range refused {
				status, _, body := get(t, u, tc.auth, tc.h)
				if status != http.StatusForbidden || isBlob(body, d) {
					t.Errorf("%s on %s for %s: %d, want 403", name, target.URL, d, status)
				}
			}
			for name, auth := range map[string]string{"no credential": "", "bob's credential": bob} {
				status, hdr, body := get(t, u, auth, sign(secret, time.Now(), auth))
				if status != http.StatusUnauthorized || isBlob(body, d) {
					t.Errorf("signed peer request, %s, on %s for %s: %d, want the origin's 401", name, target.URL, d, status)
				}
				if !strings.Contains(hdr.Get("Www-Authenticate"), origin.Tokens.Realm) {
					t.Errorf("signed peer request, %s: challenge %q, want the origin's", name, hdr.Get("Www-Authenticate"))
				}
			}
		}
	}
	if rej := replicaMetric(t, cr.Replicas, "cove_peer_requests_total", `result="rejected"`); rej != float64(4*2*len(cr.Replicas)) {
		t.Errorf("rejected peer requests = %v, want %d", rej, 4*2*len(cr.Replicas))
	}
	for _, q := range origin.Requests() {
		if q.Method == http.MethodGet && strings.HasSuffix(q.Path, "/blobs/"+uncached) && q.Status < 300 {
			t.Errorf("the origin sent the uncached blob (%d, %d bytes) to a request of the attacks", q.Status, q.Bytes)
		}
	}
	if got := blobDigestOf(t, blobURL(cr.Replicas[2], cached), alice); got != cached {
		t.Fatalf("alice after the attacks: %s", got)
	}
	for _, c := range cr.Replicas {
		c.Stop()
		log, err := os.ReadFile(c.LogPath)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(log), string(secret)) {
			t.Fatalf("%s logged the peer secret", c.URL)
		}
		for _, s := range signatures {
			if strings.Contains(string(log), s) {
				t.Fatalf("%s logged a peer signature", c.URL)
			}
		}
	}
}

// signedHeader returns the peer headers a signs for a GET of u with auth, from sender.
func signedHeader(a *cluster.PeerAuth, u, auth, sender string) http.Header {
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	a.Sign(req, sender)
	h := http.Header{}
	for _, k := range []string{cluster.HeaderPeer, cluster.HeaderTime, cluster.HeaderSignature} {
		h.Set(k, req.Header.Get(k))
	}
	return h
}

// get sends a GET of u with auth and extra headers.
func get(t *testing.T, u, auth string, extra http.Header) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	for k, v := range extra {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, body
}

func blobDigestOf(t *testing.T, u, auth string) string {
	t.Helper()
	status, _, body := get(t, u, auth, nil)
	if status != http.StatusOK {
		t.Fatalf("GET %s: %d %s", u, status, body)
	}
	sum := sha256.Sum256(body)
	return "sha256:" + hex.EncodeToString(sum[:])
}

func isBlob(body []byte, d string) bool {
	sum := sha256.Sum256(body)
	return "sha256:"+hex.EncodeToString(sum[:]) == d
}
