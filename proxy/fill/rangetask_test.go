package fill

import (
	"bytes"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// Attack: one range's bytes are corrupt. The fill fails, a full-body reader gets an
// error (never a clean end), and nothing is stored.
func TestSegmentCorruptFailsFill(t *testing.T) {
	body := randomBytes(t, 6<<20)
	bad := append([]byte(nil), body...)
	bad[3<<20+5] ^= 0xff
	o := startRangeOrigin(t, body, func(w http.ResponseWriter, r *http.Request) bool {
		if strings.HasPrefix(r.Header.Get("Range"), "bytes="+strconv.Itoa(3<<20)+"-") {
			http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(bad))
			return true
		}
		return false
	})
	m, c, dir := newManager(t, parallelOpts(3)...)
	d := digest.FromBytes(body)
	got, err := readWhole(t, m, Key{"r", d}, get(o.URL))
	if !errors.Is(err, ErrFailed) {
		t.Fatalf("read %d bytes, err %v; want ErrFailed", len(got), err)
	}
	if len(got) >= len(body) {
		t.Fatalf("reader got all %d bytes of a corrupt blob", len(got))
	}
	waitGone(t, m)
	if _, ok := c.get(d); ok {
		t.Fatal("a corrupt blob was stored")
	}
	assertSpoolEmpty(t, dir)
	if o.ranged() == 0 {
		t.Fatal("the blob was not fetched in ranges")
	}
}

// A range whose connection drops is resumed from its last byte received, with a
// bounded range; the blob is whole and stored.
func TestSegmentResumedAfterDrop(t *testing.T) {
	body := randomBytes(t, 6<<20)
	var dropped sync.Once
	o := startRangeOrigin(t, body, func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Range") != "bytes="+strconv.Itoa(2<<20)+"-"+strconv.Itoa(3<<20-1) {
			return false
		}
		cut := false
		dropped.Do(func() { cut = true })
		if !cut {
			return false
		}
		w.Header().Set("Content-Range", "bytes "+strconv.Itoa(2<<20)+"-"+strconv.Itoa(3<<20-1)+"/"+strconv.Itoa(len(body)))
		w.Header().Set("Content-Length", strconv.Itoa(1<<20))
		w.WriteHeader(http.StatusPartialContent)
		_, _ = w.Write(body[2<<20 : 2<<20+300<<10])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // the connection drops mid-range
	})
	var resumes []string
	var mu sync.Mutex
	m, c, _ := newManager(t, append(parallelOpts(3), WithEvents(Events{Resume: func(r string) {
		mu.Lock()
		resumes = append(resumes, r)
		mu.Unlock()
	}}))...)
	d := digest.FromBytes(body)
	if got, err := readWhole(t, m, Key{"r", d}, get(o.URL)); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read %d bytes, err %v", len(got), err)
	}
	waitGone(t, m)
	if stored, ok := c.get(d); !ok || !bytes.Equal(stored, body) {
		t.Fatal("not stored whole")
	}
	want := "bytes=" + strconv.Itoa(2<<20+300<<10) + "-" + strconv.Itoa(3<<20-1)
	if !slices.ContainsFunc(o.requests(), func(q originReq) bool { return q.rng == want }) {
		t.Fatalf("no resume request %q among %v", want, o.requests())
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(resumes, []string{ResumeRanged}) {
		t.Fatalf("resume events %v, want one ranged", resumes)
	}
}

// An origin that ignores ranges (answers every request with the whole body) gets the
// blob fetched in one stream: the first body goes on to the end.
func TestParallelOriginIgnoresRanges(t *testing.T) {
	body := randomBytes(t, 5<<20+7)
	o := startRangeOrigin(t, body, func(w http.ResponseWriter, r *http.Request) bool {
		r.Header.Del("Range")
		return false
	})
	m, c, _ := newManager(t, parallelOpts(3)...)
	d := digest.FromBytes(body)
	if got, err := readWhole(t, m, Key{"r", d}, get(o.URL)); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read %d bytes, err %v", len(got), err)
	}
	waitGone(t, m)
	if stored, ok := c.get(d); !ok || !bytes.Equal(stored, body) {
		t.Fatal("not stored whole")
	}
	if n := len(o.requests()); n > 3 {
		t.Fatalf("origin saw %d requests: want the first and at most one refused range per other worker", n)
	}
}
