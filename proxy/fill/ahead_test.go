package fill

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// A range far ahead of the fill is fetched for its reader at once, before the fill's
// in-order ranges (asserted by the order the origin saw the requests), and served while
// the rest of the blob has not arrived; the whole blob is then still verified and stored.
func TestAheadRangeFetchedFirst(t *testing.T) {
	body := randomBytes(t, 8<<20)
	const ahead = 6<<20 + 100
	gate := make(chan struct{})
	o := startRangeOrigin(t, body, func(w http.ResponseWriter, r *http.Request) bool {
		// Everything but the ahead range waits for the gate: the fill makes no progress
		// of its own until the test has read the ahead range.
		if !strings.HasPrefix(r.Header.Get("Range"), "bytes="+strconv.Itoa(ahead)+"-") {
			if r.Header.Get("Range") == "" {
				w.Header().Set("Content-Length", strconv.Itoa(len(body)))
				w.WriteHeader(http.StatusOK)
				w.(http.Flusher).Flush()
				<-gate
				_, _ = w.Write(body)
				return true
			}
			<-gate
		}
		return false
	})
	t.Cleanup(func() { openGate(gate) }) // before the origin's Close, which waits for handlers
	m, c, _ := newManager(t, parallelOpts(2)...)
	d := digest.FromBytes(body)
	f, _ := m.Join(Key{"r", d}, "o", get(o.URL))
	defer f.Release()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := f.Response(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if _, err := io.ReadFull(f.NewRangeReader(ctx, ahead, int64(len(got))), got); err != nil {
		t.Fatalf("ahead range: %v", err)
	}
	if !bytes.Equal(got, body[ahead:ahead+len(got)]) {
		t.Fatal("ahead range has wrong bytes")
	}
	if done, _ := f.Done(); done {
		t.Fatal("fill ended before the gate opened")
	}
	openGate(gate)
	whole, err := io.ReadAll(f.NewReader(ctx, 0, -1))
	if err != nil || !bytes.Equal(whole, body) {
		t.Fatalf("whole read %d bytes, err %v", len(whole), err)
	}
	waitGone(t, m)
	if stored, ok := c.get(d); !ok || !bytes.Equal(stored, body) {
		t.Fatal("not stored whole")
	}
	// Order: the whole body, the second worker's first range, then the ahead range,
	// before any other in-order range.
	reqs := o.requests()
	at := -1
	for i, q := range reqs {
		if strings.HasPrefix(q.rng, "bytes="+strconv.Itoa(ahead)+"-") {
			at = i
		}
	}
	if at < 0 {
		t.Fatalf("no request for the ahead range among %v", reqs)
	}
	for _, q := range reqs[:at] {
		if q.rng == "" {
			continue
		}
		if from, _ := parseRangeHeader(t, q.rng); from >= 2<<20 {
			t.Fatalf("in-order range %q asked before the ahead range: %v", q.rng, reqs)
		}
	}
	if at > 2 {
		t.Fatalf("ahead range was request %d: %v", at, reqs)
	}
}

// A reader of the whole body still gets the last byte only once the blob is verified,
// also when the ranges arrive out of order; a bounded range ending at the last byte gets
// it as soon as it is there.
func TestAheadLastByteWithheldFromWholeReads(t *testing.T) {
	body := randomBytes(t, 4<<20)
	gate := make(chan struct{})
	o := startRangeOrigin(t, body, func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Range") == "" {
			// The first body's headers go at once (the fill goes on to ranges); its bytes,
			// and the second range's, wait: the prefix cannot be verified yet.
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			<-gate
			_, _ = w.Write(body)
			return true
		}
		if strings.HasPrefix(r.Header.Get("Range"), "bytes=1048576-") {
			<-gate
		}
		return false
	})
	t.Cleanup(func() { openGate(gate) }) // before the origin's Close, which waits for handlers
	m, _, _ := newManager(t, parallelOpts(2)...)
	d := digest.FromBytes(body)
	f, _ := m.Join(Key{"r", d}, "o", get(o.URL))
	defer f.Release()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() { _, _ = f.Response(ctx) }()
	tail := int64(len(body)) - 51
	got, err := io.ReadAll(f.NewRangeReader(ctx, tail, 51))
	if err != nil || !bytes.Equal(got, body[tail:]) {
		t.Fatalf("bounded tail range: %d bytes, err %v", len(got), err)
	}
	// A read to the end from the same place must wait for verification.
	open := f.NewReader(ctx, tail, -1)
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelShort()
	withheld := f.NewReader(short, tail, -1)
	if b, err := io.ReadAll(withheld); err == nil || len(b) >= 51 {
		t.Fatalf("a read to the end got %d bytes (err %v) before the blob was verified", len(b), err)
	}
	openGate(gate)
	if b, err := io.ReadAll(open); err != nil || !bytes.Equal(b, body[tail:]) {
		t.Fatalf("read to the end after verification: %d bytes, err %v", len(b), err)
	}
	waitGone(t, m)
}

// openGate opens a gate (a channel closed once) the origin's handlers wait on.
func openGate(gate chan struct{}) {
	select {
	case <-gate:
	default:
		close(gate)
	}
}

// Attack: a client asks for many ranges far apart at once. At most as many ranges are
// fetched ahead at a time as the fill has workers (memory and origin connections stay
// bounded); the others wait their turn, and every range is served right.
func TestAheadFetchesBounded(t *testing.T) {
	body := randomBytes(t, 12<<20)
	gate := make(chan struct{})
	o := startRangeOrigin(t, body, func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Range") == "" {
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.WriteHeader(http.StatusOK)
			w.(http.Flusher).Flush()
			<-gate
			_, _ = w.Write(body)
			return true
		}
		<-gate
		return false
	})
	t.Cleanup(func() { openGate(gate) }) // before the origin's Close, which waits for handlers
	const workers = 2
	m, c, _ := newManager(t, parallelOpts(workers)...)
	d := digest.FromBytes(body)
	f, _ := m.Join(Key{"r", d}, "o", get(o.URL))
	defer f.Release()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := f.Response(ctx); err != nil {
		t.Fatal(err)
	}
	for { // the fill goes on to ranges once it has the first answer
		f.mu.Lock()
		ready := f.par != nil
		f.mu.Unlock()
		if ready {
			break
		}
		time.Sleep(time.Millisecond)
	}
	offsets := []int64{3<<20 + 7, 5 << 20, 7<<20 + 1, 9 << 20, 11<<20 + 3}
	f.mu.Lock()
	for _, off := range offsets {
		f.wantAhead(off)
	}
	ahead, tasks := f.par.ahead, len(f.par.tasks)
	f.mu.Unlock()
	// The workers' own in-order ranges come on top (the second one's claim may not have
	// happened yet).
	if ahead != workers || tasks > workers+workers {
		t.Fatalf("%d ranges ahead, %d fetches in all; want %d ahead, at most %d in all", ahead, tasks, workers, 2*workers)
	}
	openGate(gate)
	for _, off := range offsets {
		got, err := io.ReadAll(f.NewRangeReader(ctx, off, 1000))
		if err != nil || !bytes.Equal(got, body[off:off+1000]) {
			t.Fatalf("range at %d: %d bytes, err %v", off, len(got), err)
		}
	}
	if whole, err := io.ReadAll(f.NewReader(ctx, 0, -1)); err != nil || !bytes.Equal(whole, body) {
		t.Fatalf("whole: %d bytes, err %v", len(whole), err)
	}
	waitGone(t, m)
	if _, ok := c.get(d); !ok {
		t.Fatal("not stored")
	}
}
