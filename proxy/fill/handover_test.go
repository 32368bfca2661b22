package fill

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
)

// getAs is get with an Authorization header: a credential of one client.
func getAs(url, credential string) FetchFunc {
	return func(ctx context.Context, from, to int64) (*http.Response, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		for k, v := range RangeHeader(from, to) {
			req.Header[k] = v
		}
		req.Header.Set("Authorization", credential)
		return http.DefaultClient.Do(req)
	}
}

// expiringOrigin serves body to credential "B" always, and to "A" only its first
// request, held until gate opens: A's token expires while the fill runs. "C" gets 404
// (it may not see the repository), any other 401.
func expiringOrigin(t *testing.T, body []byte, gate chan struct{}, dropFirstAt int) *rangeOrigin {
	o := startRangeOrigin(t, body, func(w http.ResponseWriter, r *http.Request) bool {
		auth := r.Header.Get("Authorization")
		if auth == "A" && r.Header.Get("Range") == "" {
			<-gate
			if dropFirstAt > 0 {
				w.Header().Set("Content-Length", strconv.Itoa(len(body)))
				w.WriteHeader(http.StatusOK)
				_, _ = w.Write(body[:dropFirstAt])
				w.(http.Flusher).Flush()
				panic(http.ErrAbortHandler) // the connection drops mid-body
			}
			return false
		}
		if auth == "C" { // a joiner that may not see the repository
			w.WriteHeader(http.StatusNotFound)
			return true
		}
		if auth != "B" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="x",error="invalid_token"`)
			w.WriteHeader(http.StatusUnauthorized)
			return true
		}
		return false
	})
	t.Cleanup(func() { openGate(gate) }) // before the origin's Close, which waits for handlers
	return o
}

// A parallel fill whose starter's credential is refused on its later ranges goes on
// with the credential of a client that joined it; the blob is whole and stored.
func TestHandoverParallelRanges(t *testing.T) {
	body := randomBytes(t, 6<<20)
	gate := make(chan struct{})
	o := expiringOrigin(t, body, gate, 0)
	m, c, _ := newManager(t, parallelOpts(3)...)
	key := Key{"r", digest.FromBytes(body)}
	f, started := m.Join(key, "a", getAs(o.URL, "A"))
	defer f.Release()
	g, joined := m.Join(key, "b", getAs(o.URL, "B"))
	defer g.Release()
	if !started || joined {
		t.Fatal("want one fill, started by A and joined by B")
	}
	openGate(gate)
	got, err := io.ReadAll(f.NewReader(context.Background(), 0, -1))
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read %d bytes, err %v", len(got), err)
	}
	waitGone(t, m)
	if stored, ok := c.get(key.Digest); !ok || !bytes.Equal(stored, body) {
		t.Fatal("not stored whole")
	}
	refusedA, rangedB := 0, 0
	for _, q := range o.requests() {
		switch {
		case q.auth == "A" && q.rng != "":
			refusedA++
		case q.auth == "B" && q.rng != "":
			rangedB++
		case q.auth == "B":
			t.Fatal("B's credential fetched the whole body again")
		}
	}
	if refusedA == 0 || rangedB == 0 {
		t.Fatalf("A's ranges refused %d, B's ranges %d: want both: %v", refusedA, rangedB, o.requests())
	}
}

// Attack: a client that may not see the repository joins a fill (its own request is
// refused by the server afterwards, but its FetchFunc was given). When the starter's
// credential expires, that joiner's 404 is taken for a refusal of its credential, not
// for the blob's absence: the fill goes on with another joiner's.
func TestHandoverSkipsJoinerThatCannotSee(t *testing.T) {
	body := randomBytes(t, 6<<20)
	gate := make(chan struct{})
	o := expiringOrigin(t, body, gate, 0)
	m, c, _ := newManager(t, parallelOpts(3)...)
	key := Key{"r", digest.FromBytes(body)}
	f, _ := m.Join(key, "a", getAs(o.URL, "A"))
	defer f.Release()
	g, _ := m.Join(key, "b", getAs(o.URL, "B"))
	defer g.Release()
	h, _ := m.Join(key, "c", getAs(o.URL, "C")) // the newest: asked first
	h.Release()
	openGate(gate)
	got, err := io.ReadAll(f.NewReader(context.Background(), 0, -1))
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read %d bytes, err %v", len(got), err)
	}
	waitGone(t, m)
	if _, ok := c.get(key.Digest); !ok {
		t.Fatal("not stored")
	}
	askedC := false
	for _, q := range o.requests() {
		askedC = askedC || q.auth == "C"
	}
	if !askedC {
		t.Fatal("the newest joiner's credential was never tried: the test proves nothing")
	}
}

// A fill resuming a dropped single stream with a refused credential resumes with a
// joiner's instead.
func TestHandoverSingleStreamResume(t *testing.T) {
	body := randomBytes(t, 3<<20)
	gate := make(chan struct{})
	o := expiringOrigin(t, body, gate, 1<<20)
	m, c, _ := newManager(t)
	key := Key{"r", digest.FromBytes(body)}
	f, _ := m.Join(key, "a", getAs(o.URL, "A"))
	defer f.Release()
	g, _ := m.Join(key, "b", getAs(o.URL, "B"))
	defer g.Release()
	openGate(gate)
	got, err := io.ReadAll(f.NewReader(context.Background(), 0, -1))
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read %d bytes, err %v", len(got), err)
	}
	waitGone(t, m)
	if _, ok := c.get(key.Digest); !ok {
		t.Fatal("not stored")
	}
	reqs := o.requests()
	last := reqs[len(reqs)-1]
	if last.auth != "B" || last.rng != "bytes=1048576-" {
		t.Fatalf("last request %+v, want B resuming at 1 MiB: %v", last, reqs)
	}
}

// Attack: a fill whose only credential expires mid-fill cuts its client off (never a
// clean end), and, when nobody comes back with a fresh credential within the wait, ends
// with an error, stores nothing, and does not hang.
func TestHandoverNoOtherCredentialEndsFill(t *testing.T) {
	body := randomBytes(t, 6<<20)
	gate := make(chan struct{})
	o := expiringOrigin(t, body, gate, 0)
	m, c, dir := newManager(t, append(parallelOpts(3), WithCredentialWait(300*time.Millisecond))...)
	key := Key{"r", digest.FromBytes(body)}
	f, _ := m.Join(key, "a", getAs(o.URL, "A"))
	openGate(gate)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got, err := io.ReadAll(f.NewReader(ctx, 0, -1))
	if !errors.Is(err, ErrCredentialWait) || !errdefs.IsUnauthorized(err) || len(got) >= len(body) {
		t.Fatalf("read %d bytes, err %v; want a cut (ErrCredentialWait, unauthenticated)", len(got), err)
	}
	// A reader made now, after the wait began, is not cut off by it: it sees the end.
	_, err = io.ReadAll(f.NewReader(ctx, int64(len(got)), -1))
	f.Release()
	if !errors.Is(err, ErrFailed) || !errdefs.IsUnauthorized(err) {
		t.Fatalf("a reader after the cut: err %v; want the fill's end (ErrFailed, unauthenticated)", err)
	}
	waitGone(t, m)
	if _, ok := c.get(key.Digest); ok {
		t.Fatal("stored a blob whose fill failed")
	}
	assertSpoolEmpty(t, dir)
}

// A fill whose only credential expires mid-fill waits; its client, cut off, comes back
// with a fresh credential and a Range request from the byte it has, joins the same
// fill, and gets the rest: the fill goes on from where it was (no byte asked twice),
// and stores the blob.
func TestHandoverClientResumesWithFreshCredential(t *testing.T) {
	body := randomBytes(t, 6<<20)
	gate := make(chan struct{})
	o := expiringOrigin(t, body, gate, 0)
	m, c, _ := newManager(t, parallelOpts(3)...)
	key := Key{"r", digest.FromBytes(body)}
	f, started := m.Join(key, "a", getAs(o.URL, "A"))
	openGate(gate)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	first, err := io.ReadAll(f.NewReader(ctx, 0, -1))
	f.Release()
	if !errors.Is(err, ErrCredentialWait) {
		t.Fatalf("read %d bytes, err %v; want a cut (ErrCredentialWait)", len(first), err)
	}
	// The same client, its token refreshed ("B" here), resumes.
	g, joined := m.JoinAt(key, "a-fresh", int64(len(first)), getAs(o.URL, "B"))
	if g == nil || !started || joined {
		t.Fatal("the resume did not join the waiting fill")
	}
	rest, err := io.ReadAll(g.NewReader(ctx, int64(len(first)), -1))
	g.Release()
	if err != nil || !bytes.Equal(append(first, rest...), body) {
		t.Fatalf("resumed read: %d+%d bytes, err %v", len(first), len(rest), err)
	}
	waitGone(t, m)
	if stored, ok := c.get(key.Digest); !ok || !bytes.Equal(stored, body) {
		t.Fatal("not stored whole")
	}
	// B never asked for the whole body, nor for a byte twice.
	var asked [][2]int64
	for _, q := range o.requests() {
		if q.auth != "B" {
			continue
		}
		var lo, hi int64
		if _, err := fmt.Sscanf(q.rng, "bytes=%d-%d", &lo, &hi); err != nil {
			t.Fatalf("B asked %q: %v", q.rng, err)
		}
		for _, a := range asked {
			if lo <= a[1] && a[0] <= hi {
				t.Fatalf("B asked bytes %d-%d and %d-%d: %v", lo, hi, a[0], a[1], o.requests())
			}
		}
		asked = append(asked, [2]int64{lo, hi})
	}
	if len(asked) == 0 {
		t.Fatal("B was never asked: the fill did not go on with the fresh credential")
	}
}

// The fill keeps at most maxFetchers credentials, one per owner, and never drops the
// one in use.
func TestHandoverFetchersBounded(t *testing.T) {
	f := &Fill{}
	f.fetchers = []fetcher{{owner: "first", fetch: get("x")}}
	for i := range 20 {
		f.addFetcher("o"+strconv.Itoa(i%12), get("x"))
	}
	if len(f.fetchers) != maxFetchers {
		t.Fatalf("%d fetchers kept, want %d", len(f.fetchers), maxFetchers)
	}
	if f.fetchers[f.cur].owner != "first" {
		t.Fatalf("the fetcher in use was dropped: %+v", f.fetchers[f.cur])
	}
	seen := map[string]bool{}
	for _, x := range f.fetchers {
		if seen[x.owner] {
			t.Fatalf("owner %s kept twice", x.owner)
		}
		seen[x.owner] = true
	}
}
