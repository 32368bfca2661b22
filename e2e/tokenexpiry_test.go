package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

// Registry tokens last minutes; a cold fill of a blob of tens of GB lasts longer. These
// tests run a real distribution registry with token authentication whose tokens it
// refuses after a few seconds, behind a per-connection rate limit, so a 96 MiB blob
// fetched in parallel ranges (cove-cache's default --fill-parallel 4) takes several
// token lifetimes, and the fill's later range requests meet the registry's 401
// invalid_token.

const (
	expiryBlobSize = 96 << 20
	expiryRate     = 2 << 20         // bytes/s per origin connection: ~12 s for the blob in 4 streams
	expiryAccepted = 4 * time.Second // how long the registry accepts a short-lived token
)

// expiryOrigin is a token-authenticated registry holding team-a/model:v1 (one layer of
// expiryBlobSize), a rate-limited connection to it, and cove-cache in front.
type expiryOrigin struct {
	origin *peers.TokenOrigin
	slow   *peers.RateLimitProxy
	cove   *peers.Cove
	layer  digest.Digest
	size   int64
	url    string // the blob at cove-cache
}

func startExpiryOrigin(t *testing.T) *expiryOrigin {
	t.Helper()
	origin := peers.StartTokenOrigin(t, map[string]string{"team-a": "team-a-secret-1x", "team-b": "team-b-secret-2x"})
	img := origin.Push(t, "team-a/model:v1", 1, expiryBlobSize)
	slow := peers.StartRateLimitProxy(t, origin.Addr, expiryRate)
	cove := peers.StartCove(t, "", "--origin-plain-http", slow.Addr, "--log-level", "debug",
		"--fill-range-size", "8MiB")
	layer := digest.Digest(img.Layers[0])
	return &expiryOrigin{
		origin: origin, slow: slow, cove: cove, layer: layer, size: img.Size,
		url: cove.URL + "/v2/team-a/model/blobs/" + layer.String() + "?ns=" + url.QueryEscape(slow.Addr),
	}
}

// token fetches a token for user with the origin's challenge for the blob (the one
// cove-cache relays; asked of the origin itself so that no anonymous request joins the
// fill), accepted by the registry for accepted from now.
func (e *expiryOrigin) token(t *testing.T, user string, accepted time.Duration) string {
	t.Helper()
	resp, err := http.Get(e.origin.URL + "/v2/team-a/model/blobs/" + e.layer.String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("anonymous GET of the blob at the origin: %d, want 401", resp.StatusCode)
	}
	e.origin.Tokens.AcceptedFor(accepted)
	tok, err := peers.FetchToken(resp.Header.Get("WWW-Authenticate"), user, e.origin.Passwords[user])
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// blobRead is what a client read of the blob: bytes, and the hash of the bytes so far.
type blobRead struct {
	n   int64
	err error
}

// readBlob GETs the blob from byte from on with token, hashing what arrives into h and
// counting into seen; it returns when the body ends or breaks.
func readBlob(url, token string, from int64, h hash.Hash, seen *countingWriter) blobRead {
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	if from > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", from))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return blobRead{err: err}
	}
	defer resp.Body.Close()
	want := http.StatusOK
	if from > 0 {
		want = http.StatusPartialContent
	}
	if resp.StatusCode != want {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return blobRead{err: fmt.Errorf("status %d, want %d: %s", resp.StatusCode, want, b)}
	}
	n, err := io.Copy(io.MultiWriter(h, seen), resp.Body)
	return blobRead{n: n, err: err}
}

// originBlobGETs is the origin's answers to GETs of the blob since request from, by
// status, and the body bytes it sent with 200 and 206.
func (e *expiryOrigin) originBlobGETs(from int) (byStatus map[int]int, bytes int64) {
	byStatus = map[int]int{}
	for _, q := range e.origin.Requests()[from:] {
		if q.Method != http.MethodGet || !strings.HasSuffix(q.Path, "/blobs/"+e.layer.String()) {
			continue
		}
		byStatus[q.Status]++
		if q.Status == http.StatusOK || q.Status == http.StatusPartialContent {
			bytes += q.Bytes
		}
	}
	return byStatus, bytes
}

// checkStored waits for the fill to end and checks the stored blob verifies.
func (e *expiryOrigin) checkStored(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for e.cove.Metric(t, "cove_fills_in_flight") > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if got, err := fileDigest(e.storedPath()); err != nil || got != e.layer {
		t.Fatalf("stored blob: digest %s, error %v", got, err)
	}
}

func (e *expiryOrigin) storedPath() string {
	return filepath.Join(e.cove.StorageDir, "blobs", "sha256", e.layer.Encoded())
}

// checkOneFill checks the origin sent each byte of the blob once (cove-cache read
// exactly the blob's size from it), in one fill.
func (e *expiryOrigin) checkOneFill(t *testing.T) {
	t.Helper()
	if got := e.cove.Metric(t, "cove_origin_bytes_total"); int64(got) != e.size {
		t.Errorf("cove-cache read %.0f bytes from the origin for a %d-byte blob: some were fetched twice", got, e.size)
	}
	if got := e.cove.Metric(t, "cove_fill_duration_seconds_count"); got != 1 {
		t.Errorf("%v fills ran, want 1", got)
	}
}

// (a) Client A starts the cold fill with its short-lived token; client B, the same tenant
// with a fresh token, joins mid-fill; A's token expires while the fill still has ranges
// to ask for: the fill goes on with B's credential. Both get the right bytes, in one
// fill, every byte fetched once, and the stored blob verifies.
func TestFillOutlivesTokenContinuesWithJoiner(t *testing.T) {
	e := startExpiryOrigin(t)
	from := len(e.origin.Requests())
	tokA := e.token(t, "team-a", expiryAccepted)
	issuedA := time.Now()

	var seenA, seenB countingWriter
	hA, hB := sha256.New(), sha256.New()
	doneA := make(chan blobRead, 1)
	go func() { doneA <- readBlob(e.url, tokA, 0, hA, &seenA) }()

	// B joins once the fill is under way, well before A's token expires.
	for seenA.count() == 0 && time.Since(issuedA) < expiryAccepted/2 {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(time.Until(issuedA.Add(expiryAccepted / 2)))
	tokB := e.token(t, "team-a", 2*time.Minute)
	if had := seenA.count(); had >= e.size/2 {
		t.Fatalf("A had %d of %d bytes when B joined: the fill is too fast to outlive A's token", had, e.size)
	}
	doneB := make(chan blobRead, 1)
	go func() { doneB <- readBlob(e.url, tokB, 0, hB, &seenB) }()

	for name, c := range map[string]struct {
		done chan blobRead
		h    hash.Hash
	}{"A": {doneA, hA}, "B": {doneB, hB}} {
		r := <-c.done
		if sum := "sha256:" + hex.EncodeToString(c.h.Sum(nil)); r.err != nil || r.n != e.size || sum != e.layer.String() {
			t.Fatalf("client %s: %d of %d bytes, %s, error %v", name, r.n, e.size, sum, r.err)
		}
	}
	took := time.Since(issuedA)
	t.Logf("both clients got the blob %s after A's token was issued (accepted for %s)", took.Round(time.Millisecond), expiryAccepted)
	if took < 2*expiryAccepted {
		t.Fatalf("the fill took %s: not clearly longer than A's token (%s)", took, expiryAccepted)
	}
	e.checkStored(t)
	e.checkOneFill(t)
	byStatus, sent := e.originBlobGETs(from)
	t.Logf("origin blob GETs by status: %v; body bytes it logged for 200/206: %d (blob %d)", byStatus, sent, e.size)
	if byStatus[http.StatusUnauthorized] == 0 {
		t.Fatal("the origin refused no request with A's expired token: the test did not outlive it")
	}
	if byStatus[http.StatusOK] != 1 {
		t.Fatalf("%d whole-body GETs at the origin, want 1", byStatus[http.StatusOK])
	}
	handedOver := false
	for _, l := range e.cove.Logs(t) {
		if l["msg"] == "origin refused a fill's credential mid-fill: continuing with another waiter's" {
			handedOver = true
		}
	}
	if !handedOver {
		t.Fatal("cove-cache did not log handing the fill over to B's credential")
	}
}

// (b) One client, whose token expires mid-fill: its transfer is cut (never a wrong or
// complete-looking body), nothing partial is stored, and the client resuming with a
// Range request and a fresh token each time gets the rest, right; the fill goes on
// from where it was rather than fetching the blob again.
func TestFillOutlivesTokenClientResumes(t *testing.T) {
	e := startExpiryOrigin(t)
	from := len(e.origin.Requests())
	h := sha256.New()
	var seen countingWriter
	var got int64
	cuts := 0
	start := time.Now()
	for try := 0; ; try++ {
		if try == 8 {
			t.Fatalf("the client has %d of %d bytes after %d resumes", got, e.size, try-1)
		}
		tok := e.token(t, "team-a", expiryAccepted)
		r := readBlob(e.url, tok, got, h, &seen)
		got += r.n
		if r.err == nil {
			break
		}
		cuts++
		if !errors.Is(r.err, io.ErrUnexpectedEOF) && !strings.Contains(r.err.Error(), "unexpected EOF") {
			t.Fatalf("try %d: the transfer ended with %v, want a cut (unexpected EOF)", try, r.err)
		}
		t.Logf("try %d: cut after %d bytes (%d of %d in all), %s in", try, r.n, got, e.size, time.Since(start).Round(time.Millisecond))
		if got >= e.size {
			t.Fatalf("the client was cut after the whole blob (%d bytes): the last byte must wait for verification", got)
		}
		if _, err := os.Stat(e.storedPath()); !os.IsNotExist(err) {
			t.Fatalf("after a cut at %d of %d bytes, the blob is in the store (stat: %v)", got, e.size, err)
		}
	}
	if sum := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != e.size || sum != e.layer.String() {
		t.Fatalf("the client's bytes, across %d resumes: %d of %d, %s", cuts, got, e.size, sum)
	}
	if cuts == 0 {
		t.Fatal("the client was never cut: the fill did not outlive its token")
	}
	t.Logf("the client got the blob right after %d cuts, %s", cuts, time.Since(start).Round(time.Millisecond))
	e.checkStored(t)
	e.checkOneFill(t)
	byStatus, sent := e.originBlobGETs(from)
	t.Logf("origin blob GETs by status: %v; body bytes it logged for 200/206: %d (blob %d)", byStatus, sent, e.size)
}
