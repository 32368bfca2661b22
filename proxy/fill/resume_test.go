package fill

import (
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// step is how a cutOrigin answers one request.
type step struct {
	cut          int           // send this many body bytes, then drop the connection (0: all)
	stall        bool          // after cut bytes, hang instead of dropping
	pause        time.Duration // before the drop
	ignoreRange  bool          // answer 200 with the whole body
	contentRange string        // a 206's Content-Range, instead of the right one
	corrupt      bool          // flip a byte of what is sent
}

// cutOrigin serves one blob, with Range support, following one step per request (the
// requests past the plan are answered right). It records every request's Range header.
type cutOrigin struct {
	*httptest.Server
	body   []byte
	plan   []step
	mu     sync.Mutex
	ranges []string
}

func newCutOrigin(t *testing.T, body []byte, plan ...step) *cutOrigin {
	o := &cutOrigin{body: body, plan: plan}
	o.Server = httptest.NewServer(http.HandlerFunc(o.serve))
	t.Cleanup(o.Close)
	return o
}

func (o *cutOrigin) requests() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]string(nil), o.ranges...)
}

func (o *cutOrigin) serve(w http.ResponseWriter, r *http.Request) {
	o.mu.Lock()
	i := len(o.ranges)
	o.ranges = append(o.ranges, r.Header.Get("Range"))
	o.mu.Unlock()
	var st step
	if i < len(o.plan) {
		st = o.plan[i]
	}
	from := 0
	if v, ok := strings.CutPrefix(r.Header.Get("Range"), "bytes="); ok {
		from, _ = strconv.Atoi(strings.TrimSuffix(v, "-"))
	}
	if st.ignoreRange {
		from = 0
	}
	out := append([]byte(nil), o.body[from:]...)
	if st.corrupt {
		out[len(out)/2] ^= 0xff
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(out)))
	if from > 0 {
		cr := fmt.Sprintf("bytes %d-%d/%d", from, len(o.body)-1, len(o.body))
		if st.contentRange != "" {
			cr = st.contentRange
		}
		w.Header().Set("Content-Range", cr)
		w.WriteHeader(http.StatusPartialContent)
	} else {
		w.WriteHeader(http.StatusOK)
	}
	if st.cut == 0 {
		_, _ = w.Write(out)
		return
	}
	_, _ = w.Write(out[:st.cut])
	w.(http.Flusher).Flush()
	time.Sleep(st.pause)
	if st.stall {
		<-r.Context().Done()
		return
	}
	conn, _, err := w.(http.Hijacker).Hijack()
	if err == nil {
		conn.Close()
	}
}

// resumeEvents records Events.Resume.
type resumeEvents struct {
	mu      sync.Mutex
	results []string
}

func (e *resumeEvents) add(r string) {
	e.mu.Lock()
	e.results = append(e.results, r)
	e.mu.Unlock()
}

func (e *resumeEvents) get() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.results...)
}

// checkRanges checks that every request after the first asked for the bytes from a
// later point than the one before, within the blob.
func checkRanges(t *testing.T, got []string, want int, size int) {
	t.Helper()
	if len(got) != want {
		t.Fatalf("origin requests %q, want %d", got, want)
	}
	if got[0] != "" {
		t.Fatalf("first request asked for %q, want the whole body", got[0])
	}
	last := 0
	for _, r := range got[1:] {
		v, ok := strings.CutPrefix(r, "bytes=")
		n, err := strconv.Atoi(strings.TrimSuffix(v, "-"))
		if !ok || err != nil || !strings.HasSuffix(v, "-") || n <= last || n >= size {
			t.Fatalf("resume requests %q: want increasing bytes=N- within the blob", got[1:])
		}
		last = n
	}
}

// A body cut short once or several times is resumed from its last byte with Range
// requests: the reader, which started before the first drop, gets one whole body, and
// the blob stored is the origin's.
func TestResumeAfterDroppedConnection(t *testing.T) {
	for _, drops := range []int{1, 3} {
		t.Run(strconv.Itoa(drops), func(t *testing.T) {
			body := randomBytes(t, 3<<20+5)
			d := digest.FromBytes(body)
			var plan []step
			for i := 0; i < drops; i++ {
				plan = append(plan, step{cut: 600 << 10, pause: 20 * time.Millisecond})
			}
			o := newCutOrigin(t, body, plan...)
			var ev resumeEvents
			m, c, dir := newManager(t, WithEvents(Events{Resume: ev.add}))
			f, _ := m.Join(Key{"r", d}, "", get(o.URL))
			got, err := readAll(f, 0, -1)
			f.Release()
			if err != nil || !bytes.Equal(got, body) {
				t.Fatalf("reader got %d bytes (err %v), want the %d-byte blob", len(got), err, len(body))
			}
			<-f.Settled()
			if b, ok := c.get(d); !ok || !bytes.Equal(b, body) {
				t.Fatal("blob not stored, or stored wrong")
			}
			checkRanges(t, o.requests(), drops+1, len(body))
			if r := ev.get(); len(r) != drops || r[0] != ResumeRanged {
				t.Fatalf("resume events %q, want %d %s", r, drops, ResumeRanged)
			}
			waitGone(t, m)
			assertSpoolEmpty(t, dir)
		})
	}
}

// An origin that stalls mid-body past the stall timeout is resumed like a drop.
func TestResumeAfterStall(t *testing.T) {
	body := randomBytes(t, 2<<20)
	d := digest.FromBytes(body)
	o := newCutOrigin(t, body, step{cut: 700 << 10, stall: true})
	m, c, _ := newManager(t, WithStallTimeout(300*time.Millisecond))
	f, _ := m.Join(Key{"r", d}, "", get(o.URL))
	got, err := readAll(f, 0, -1)
	f.Release()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("reader got %d bytes (err %v), want the blob", len(got), err)
	}
	<-f.Settled()
	if _, ok := c.get(d); !ok {
		t.Fatal("blob not stored")
	}
	checkRanges(t, o.requests(), 2, len(body))
}

// A pass-through fill (the store refused the blob) resumes the same way; nothing is
// stored.
func TestResumePassThrough(t *testing.T) {
	body := randomBytes(t, 3<<20)
	d := digest.FromBytes(body)
	o := newCutOrigin(t, body, step{cut: 1 << 20, pause: 20 * time.Millisecond})
	var rs reservations
	rs.refuse.Store(true)
	m, c, dir := newManager(t, WithReserve(rs.reserve), WithPassThroughWindow(256<<10))
	f, _ := m.Join(Key{"r", d}, "", get(o.URL))
	got, err := readAll(f, 0, -1)
	f.Release()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("reader got %d bytes (err %v), want the blob", len(got), err)
	}
	<-f.Settled()
	if !f.PassingThrough() {
		t.Fatal("fill did not pass through")
	}
	if _, ok := c.get(d); ok {
		t.Fatal("a passed-through blob was stored")
	}
	checkRanges(t, o.requests(), 2, len(body))
	waitGone(t, m)
	assertSpoolEmpty(t, dir)
}

// A resume answered with 200 (the origin ignored the range) starts the body over while
// no reader has a byte, and the blob is stored.
func TestResumeAnsweredWholeBeforeAnyReader(t *testing.T) {
	body := randomBytes(t, 2<<20)
	d := digest.FromBytes(body)
	o := newCutOrigin(t, body, step{cut: 512 << 10}, step{ignoreRange: true})
	var ev resumeEvents
	m, c, _ := newManager(t, WithEvents(Events{Resume: ev.add}))
	f, _ := m.Join(Key{"r", d}, "", get(o.URL))
	<-f.Settled() // no reader until the fill has ended
	got, err := readAll(f, 0, -1)
	f.Release()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("reader got %d bytes (err %v), want the blob", len(got), err)
	}
	if b, ok := c.get(d); !ok || !bytes.Equal(b, body) {
		t.Fatal("blob not stored, or stored wrong")
	}
	if r := ev.get(); len(r) != 1 || r[0] != ResumeRestarted {
		t.Fatalf("resume events %q, want one %s", r, ResumeRestarted)
	}
}

// Resumes that cannot be trusted fail the fill cleanly: every reader ends with an error
// wrapping ErrFailed, nothing is stored, the spool is removed.
func TestResumeFailsCleanly(t *testing.T) {
	const size = 3 << 20
	cut := step{cut: 512 << 10, pause: 50 * time.Millisecond}
	for _, tc := range []struct {
		name     string
		plan     []step
		requests int
	}{
		{"too many drops", []step{cut, cut, cut, cut}, 4},
		{"200 after a reader had bytes", []step{cut, {ignoreRange: true}}, 2},
		{"wrong Content-Range start", []step{cut, {contentRange: fmt.Sprintf("bytes 0-%d/%d", size-1, size)}}, 2},
		{"different size", []step{cut, {contentRange: fmt.Sprintf("bytes %d-%d/%d", 512<<10, size, size+1)}}, 2},
		{"different bytes", []step{cut, {corrupt: true}}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body := randomBytes(t, size)
			d := digest.FromBytes(body)
			o := newCutOrigin(t, body, tc.plan...)
			var ev resumeEvents
			m, c, dir := newManager(t, WithEvents(Events{Resume: ev.add}))
			f, _ := m.Join(Key{"r", d}, "", get(o.URL))
			got, err := readAll(f, 0, -1)
			f.Release()
			if !errors.Is(err, ErrFailed) {
				t.Fatalf("reader ended with %v after %d bytes, want ErrFailed", err, len(got))
			}
			if len(got) >= size {
				t.Fatalf("reader got all %d bytes of a failed fill", len(got))
			}
			if tc.name != "different bytes" && !bytes.Equal(got, body[:len(got)]) {
				t.Fatal("reader got bytes that are not the blob's")
			}
			<-f.Settled()
			if _, ok := c.get(d); ok {
				t.Fatal("a failed fill stored its blob")
			}
			if n := len(o.requests()); n != tc.requests {
				t.Fatalf("%d origin requests, want %d", n, tc.requests)
			}
			if tc.name != "different bytes" {
				if r := ev.get(); len(r) == 0 || r[len(r)-1] != ResumeFailed {
					t.Fatalf("resume events %q, want the last %s", r, ResumeFailed)
				}
			}
			waitGone(t, m)
			assertSpoolEmpty(t, dir)
		})
	}
}

func TestParseContentRange(t *testing.T) {
	for v, want := range map[string][3]int64{
		"bytes 5-9/10":   {5, 10, 1},
		"bytes 0-0/1":    {0, 1, 1},
		"bytes 5-8/10":   {0, 0, 0}, // not to the end
		"bytes 5-9/*":    {0, 0, 0},
		"bytes */10":     {0, 0, 0},
		"items 5-9/10":   {0, 0, 0},
		"bytes 9-5/10":   {0, 0, 0},
		"bytes 5-10/10":  {0, 0, 0},
		"bytes -1-9/10":  {0, 0, 0},
		"":               {0, 0, 0},
		"bytes 5-9/10/3": {0, 0, 0},
	} {
		s, total, ok := parseContentRange(v)
		if ok != (want[2] == 1) || s != want[0] || total != want[1] {
			t.Errorf("parseContentRange(%q) = %d, %d, %v; want %v", v, s, total, ok, want)
		}
	}
}

func TestRangeHeader(t *testing.T) {
	if h := RangeHeader(0, -1); h != nil {
		t.Fatalf("RangeHeader(0, -1) = %v, want nil", h)
	}
	if v := RangeHeader(42, -1).Get("Range"); v != "bytes=42-" {
		t.Fatalf("RangeHeader(42, -1) = %q", v)
	}
	if v := RangeHeader(0, 99).Get("Range"); v != "bytes=0-99" {
		t.Fatalf("RangeHeader(0, 99) = %q", v)
	}
	if v := RangeHeader(100, 199).Get("Range"); v != "bytes=100-199" {
		t.Fatalf("RangeHeader(100, 199) = %q", v)
	}
}
