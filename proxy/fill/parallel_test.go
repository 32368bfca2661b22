package fill

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// rangeOrigin is an origin serving one blob with ranges honoured (http.ServeContent),
// recording every request's Range and Authorization headers in the order they arrive.
type rangeOrigin struct {
	*httptest.Server
	mu   sync.Mutex
	reqs []originReq
}

type originReq struct{ rng, auth string }

// startRangeOrigin starts it; hook, when given, sees each request first and answers it
// itself by returning true.
func startRangeOrigin(t *testing.T, body []byte, hook func(w http.ResponseWriter, r *http.Request) bool) *rangeOrigin {
	o := &rangeOrigin{}
	o.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.mu.Lock()
		o.reqs = append(o.reqs, originReq{rng: r.Header.Get("Range"), auth: r.Header.Get("Authorization")})
		o.mu.Unlock()
		if hook != nil && hook(w, r) {
			return
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(body))
	}))
	t.Cleanup(o.Close)
	return o
}

func (o *rangeOrigin) requests() []originReq {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.reqs)
}

// ranged counts the requests with a Range header.
func (o *rangeOrigin) ranged() int {
	n := 0
	for _, q := range o.requests() {
		if q.rng != "" {
			n++
		}
	}
	return n
}

// parseRangeHeader parses "bytes=a-b" (b < 0 for "bytes=a-").
func parseRangeHeader(t *testing.T, v string) (int64, int64) {
	t.Helper()
	a, b, ok := strings.Cut(strings.TrimPrefix(v, "bytes="), "-")
	from, err := strconv.ParseInt(a, 10, 64)
	if !ok || err != nil {
		t.Fatalf("bad Range %q", v)
	}
	if b == "" {
		return from, -1
	}
	to, err := strconv.ParseInt(b, 10, 64)
	if err != nil {
		t.Fatalf("bad Range %q", v)
	}
	return from, to
}

// readWhole joins a fill for key and reads its whole body.
func readWhole(t *testing.T, m *Manager, key Key, fetch FetchFunc) ([]byte, error) {
	t.Helper()
	f, _ := m.Join(key, "o", fetch)
	defer f.Release()
	return io.ReadAll(f.NewReader(context.Background(), 0, -1))
}

func parallelOpts(workers int) []Option {
	return []Option{WithParallel(workers), WithRangeSize(1 << 20), WithParallelMin(2 << 20)}
}

// A large blob is fetched in bounded ranges, several at once, that cover it exactly once
// after the first stream's part; what is stored verifies.
func TestParallelFillCoversBlobOnce(t *testing.T) {
	body := randomBytes(t, 10<<20+123)
	var o *rangeOrigin
	o = startRangeOrigin(t, body, func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Range") == "" {
			// The first body's headers go at once; its bytes wait until the other workers
			// asked for their ranges, so several ranges are in flight at once whatever
			// the machine's pace.
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			for o.ranged() < 3 && r.Context().Err() == nil {
				time.Sleep(time.Millisecond)
			}
			_, _ = w.Write(body)
			return true
		}
		return false
	})
	m, c, dir := newManager(t, parallelOpts(4)...)
	d := digest.FromBytes(body)
	got, err := readWhole(t, m, Key{"r", d}, get(o.URL))
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read %d bytes, err %v", len(got), err)
	}
	waitGone(t, m)
	if stored, ok := c.get(d); !ok || digest.FromBytes(stored) != d {
		t.Fatal("blob not stored, or stored wrong")
	}
	reqs := o.requests()
	if reqs[0].rng != "" {
		t.Fatalf("first request asked Range %q, want the whole body", reqs[0].rng)
	}
	var spans [][2]int64
	for _, q := range reqs[1:] {
		from, to := parseRangeHeader(t, q.rng)
		if to < 0 || to-from+1 > 1<<20 {
			t.Fatalf("range %q is not a bounded range of at most 1 MiB", q.rng)
		}
		spans = append(spans, [2]int64{from, to})
	}
	if len(spans) < 3 {
		t.Fatalf("origin saw %d ranged requests, want several: %v", len(spans), reqs)
	}
	slices.SortFunc(spans, func(a, b [2]int64) int { return int(a[0] - b[0]) })
	// The first stream took [0, spans[0][0]); the ranges take the rest, once each.
	if spans[0][0]%(1<<20) != 0 || spans[0][0] == 0 {
		t.Fatalf("first range starts at %d", spans[0][0])
	}
	for i := 1; i < len(spans); i++ {
		if spans[i][0] != spans[i-1][1]+1 {
			t.Fatalf("ranges overlap or leave a gap: %v", spans)
		}
	}
	if last := spans[len(spans)-1][1]; last != int64(len(body))-1 {
		t.Fatalf("ranges end at %d of %d", last, len(body))
	}
	assertSpoolEmpty(t, dir)
}

// A blob under the threshold is fetched in one request, as before.
func TestParallelBelowThresholdOneRequest(t *testing.T) {
	body := randomBytes(t, 2<<20-1)
	o := startRangeOrigin(t, body, nil)
	m, c, _ := newManager(t, parallelOpts(4)...)
	d := digest.FromBytes(body)
	if got, err := readWhole(t, m, Key{"r", d}, get(o.URL)); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read %d bytes, err %v", len(got), err)
	}
	waitGone(t, m)
	if _, ok := c.get(d); !ok {
		t.Fatal("not stored")
	}
	if reqs := o.requests(); len(reqs) != 1 || reqs[0].rng != "" {
		t.Fatalf("origin saw %v, want one whole-body request", reqs)
	}
}

// A store that refuses the blob passes it through in one stream, as before.
func TestParallelPassThroughOneStream(t *testing.T) {
	body := randomBytes(t, 5<<20)
	o := startRangeOrigin(t, body, nil)
	rs := &reservations{}
	rs.refuse.Store(true)
	m, c, _ := newManager(t, append(parallelOpts(3), WithReserve(rs.reserve))...)
	d := digest.FromBytes(body)
	if got, err := readWhole(t, m, Key{"r", d}, get(o.URL)); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read %d bytes, err %v", len(got), err)
	}
	waitGone(t, m)
	if _, ok := c.get(d); ok {
		t.Fatal("a refused blob was stored")
	}
	if reqs := o.requests(); len(reqs) != 1 || reqs[0].rng != "" {
		t.Fatalf("origin saw %v, want one whole-body request", reqs)
	}
}
