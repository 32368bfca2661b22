package fill

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

// waitChan waits for ch, or for r's client to go away.
func waitChan(r *http.Request, ch chan struct{}) {
	select {
	case <-ch:
	case <-r.Context().Done():
	}
}

// gatedOrigin serves body with ranges honoured (rangeOrigin). To the fill started with
// credential "first" it sends the first body's first firstRange bytes, and the rest only
// once a bounded range was asked for (so the fill is in ranges whatever the machine's
// pace); it holds the bounded ranges until prefixIn closes, so the first range is
// spooled before any other, and the open-ended range, the rest of the blob, until
// restGo closes; rest, when given, answers that one. Other credentials are served at once.
func gatedOrigin(t *testing.T, body []byte, firstRange int, prefixIn, restGo chan struct{}, rest http.HandlerFunc) *rangeOrigin {
	var o *rangeOrigin
	o = startRangeOrigin(t, body, func(w http.ResponseWriter, r *http.Request) bool {
		rng := r.Header.Get("Range")
		switch {
		case r.Header.Get("Authorization") != "first":
			return false
		case rng == "":
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write(body[:firstRange])
			w.(http.Flusher).Flush()
			for o.ranged() == 0 && r.Context().Err() == nil {
				time.Sleep(time.Millisecond)
			}
			_, _ = w.Write(body[firstRange:])
		case strings.HasSuffix(rng, "-"):
			waitChan(r, restGo)
			if rest == nil {
				return false
			}
			rest(w, r)
		default:
			waitChan(r, prefixIn)
			return false
		}
		return true
	})
	return o
}

// byCredential returns the Range headers of the requests made with credential.
func (o *rangeOrigin) byCredential(credential string) []string {
	var out []string
	for _, q := range o.requests() {
		if q.auth == credential {
			out = append(out, q.rng)
		}
	}
	return out
}

func waitPassing(t *testing.T, f *Fill) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !f.PassingThrough() {
		if done, err := f.Done(); done || time.Now().After(deadline) {
			t.Fatalf("fill never passed its blob through (ended %v: %v)", done, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Attack: the spool's filesystem (a 1 MiB tmpfs) fills up while a 6 MiB blob is fetched
// in ranges. The fill does not end: two readers there from the start and a joiner that
// comes after the spool failed get the whole blob, right, from one more origin request
// for the bytes after the spooled prefix; a reader that stops is cut off cleanly (it
// resumes); nothing is stored; it is counted once. While the store is degraded the next
// fill goes in one stream; with room again, a fill is stored, and the next goes in
// ranges again.
func TestParallelSpoolFullPassesRestThrough(t *testing.T) {
	dir := peers.MountTmpfs(t, "size=1m")
	body := randomBytes(t, 6<<20+5)
	const firstBytes = 1 << 20 // the first range (parallelOpts): the whole tmpfs
	prefixIn, restGo := make(chan struct{}), make(chan struct{})
	o := gatedOrigin(t, body, firstBytes, prefixIn, restGo, nil)
	var ev events
	c := &committed{blobs: map[digest.Digest][]byte{}}
	spool := filepath.Join(dir, "spool")
	m, err := NewManager(spool, c.commit, append(parallelOpts(3), WithEvents(ev.hooks()),
		WithPassThroughWindow(1<<20), WithPassThroughLag(5*time.Second))...)
	if err != nil {
		t.Fatal(err)
	}
	key := Key{"r", digest.FromBytes(body)}
	ctx := context.Background()
	f, _ := m.Join(key, "o", getAs(o.URL, "first"))

	stalled := f.NewReader(ctx, 0, -1)
	if _, err := io.ReadFull(stalled, make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	// The first range is in the spool before any other arrives: the prefix kept is at
	// least as long.
	if got, err := io.ReadAll(f.NewRangeReader(ctx, 0, firstBytes)); err != nil || !bytes.Equal(got, body[:firstBytes]) {
		t.Fatalf("first bytes: %v", err)
	}
	var wg sync.WaitGroup
	read := func(name string, fn func() ([]byte, error)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := fn()
			if err != nil || !bytes.Equal(got, body) {
				t.Errorf("%s: %v, %d bytes, equal %v", name, err, len(got), bytes.Equal(got, body))
			}
		}()
	}
	read("reader (Read)", func() ([]byte, error) { return io.ReadAll(f.NewReader(ctx, 0, -1)) })
	read("reader (WriteTo)", func() ([]byte, error) { return readAll(f, 0, -1) })
	close(prefixIn)

	waitPassing(t, f)
	late, started := m.JoinAt(key, "late", 0, getAs(o.URL, "late"))
	if started || late != f {
		t.Fatal("a joiner from byte 0, still in the spool, did not join the fill passing through")
	}
	read("late joiner", func() ([]byte, error) { return readAll(late, 0, -1) })
	close(restGo)
	wg.Wait()
	if _, err := io.ReadAll(stalled); !errors.Is(err, ErrBehind) || errors.Is(err, ErrFailed) {
		t.Fatalf("stalled reader: %v, want ErrBehind (its client resumes)", err)
	}
	<-f.Settled()
	if done, err := f.Done(); !done || err != nil {
		t.Fatalf("fill: done %v, %v", done, err)
	}
	late.Release()
	f.Release()
	if _, ok := c.get(key.Digest); ok {
		t.Fatal("stored a blob whose spool failed")
	}
	assertSpoolEmpty(t, spool)
	storeErrs, passed, cut, conditions := ev.snapshot()
	if fmt.Sprint(storeErrs) != "[write/no_space]" || fmt.Sprint(passed) != "[no_space]" || cut != 1 || fmt.Sprint(conditions) != "[true]" {
		t.Fatalf("store errors %v, passed through %v, cut %d, conditions %v", storeErrs, passed, cut, conditions)
	}
	if cond, degraded := m.StoreDegraded(); !degraded || cond.Op != "write" || cond.Reason != "no_space" {
		t.Fatalf("StoreDegraded = %+v, %v", cond, degraded)
	}

	// The origin: one whole-body request, bounded ranges, and one request for the rest,
	// from the end of the spooled prefix.
	var whole, bounded, rest []string
	for _, rng := range o.byCredential("first") {
		switch {
		case rng == "":
			whole = append(whole, rng)
		case strings.HasSuffix(rng, "-"):
			rest = append(rest, rng)
		default:
			bounded = append(bounded, rng)
		}
	}
	if len(whole) != 1 || len(bounded) == 0 || len(rest) != 1 {
		t.Fatalf("origin saw %d whole, %d bounded, %d open-ended requests: %v", len(whole), len(bounded), len(rest), o.requests())
	}
	if from, _ := parseRangeHeader(t, rest[0]); from < firstBytes || from >= int64(len(body)) {
		t.Fatalf("rest asked from byte %d: want the prefix's end, at least %d", from, firstBytes)
	}
	if n := len(o.byCredential("late")); n != 0 {
		t.Fatalf("the late joiner's credential made %d requests", n)
	}
	t.Logf("rest of the blob fetched with Range %q after %d ranged requests", rest[0], len(bounded))

	// Still degraded: the next fill goes in one stream, and passes through.
	if got, err := readWhole(t, m, key, getAs(o.URL, "second")); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("second fill: %d bytes, %v", len(got), err)
	}
	waitGone(t, m)
	if q := o.byCredential("second"); len(q) != 1 || q[0] != "" {
		t.Fatalf("second fill asked %q, want one whole-body request", q)
	}
	if _, ok := c.get(key.Digest); ok {
		t.Fatal("stored a blob larger than the store")
	}

	// Room again, no restart: the next fill stores the blob, and the next ones go in
	// ranges again.
	peers.RemountTmpfs(t, dir, 0, "size=32m")
	if got, err := readWhole(t, m, key, getAs(o.URL, "third")); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("third fill: %d bytes, %v", len(got), err)
	}
	waitGone(t, m)
	if b, ok := c.get(key.Digest); !ok || !bytes.Equal(b, body) {
		t.Fatal("not stored once space returned")
	}
	if _, degraded := m.StoreDegraded(); degraded {
		t.Fatal("still degraded after the blob was stored")
	}
	if !m.inRanges(int64(len(body))) {
		t.Fatal("fills do not go in ranges once the store takes blobs again")
	}
	if _, _, _, conditions := ev.snapshot(); fmt.Sprint(conditions) != "[true false]" {
		t.Fatalf("conditions %v, want [true false]", conditions)
	}
}

// Attack: the spool fails before the first byte of the blob is in it. The rest is the
// whole blob: asked with a plain GET, and passed through to every reader.
func TestParallelSpoolFullBeforeFirstByte(t *testing.T) {
	dir := peers.MountTmpfs(t, "size=1m")
	body := randomBytes(t, 5<<20+3)
	var plain atomic.Int32
	o := startRangeOrigin(t, body, func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Range") != "" || plain.Add(1) > 1 {
			return false
		}
		// The first body sends nothing until the fill gives up on it.
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		<-r.Context().Done()
		return true
	})
	var ev events
	c := &committed{blobs: map[digest.Digest][]byte{}}
	m, err := NewManager(filepath.Join(dir, "spool"), c.commit, append(parallelOpts(3), WithEvents(ev.hooks()))...)
	if err != nil {
		t.Fatal(err)
	}
	key := Key{"r", digest.FromBytes(body)}
	f, _ := m.Join(key, "o", get(o.URL))
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if got, err := readAll(f, 0, -1); err != nil || !bytes.Equal(got, body) {
				t.Errorf("reader %d: %v, %d bytes", i, err, len(got))
			}
		}()
	}
	wg.Wait()
	<-f.Settled()
	f.Release()
	if !f.PassingThrough() {
		t.Fatal("fill did not pass its blob through")
	}
	if _, ok := c.get(key.Digest); ok {
		t.Fatal("stored a blob whose spool failed")
	}
	if plain.Load() != 2 {
		t.Fatalf("origin saw %d whole-body requests, want 2 (the first, and the rest from byte 0)", plain.Load())
	}
	if _, passed, _, _ := ev.snapshot(); fmt.Sprint(passed) != "[no_space]" {
		t.Fatalf("passed through %v", passed)
	}
}

// Attack: the origin answers the request for the rest with the whole body (it ignores
// the range) while readers have bytes already. As for a resume, the fill ends: every
// reader gets an error, never a clean end, and nothing is stored.
func TestParallelSpoolFullRestRangeIgnored(t *testing.T) {
	dir := peers.MountTmpfs(t, "size=1m")
	body := randomBytes(t, 5<<20+7)
	const firstBytes = 1 << 20 // the first range (parallelOpts): the whole tmpfs
	prefixIn, restGo := make(chan struct{}), make(chan struct{})
	o := gatedOrigin(t, body, firstBytes, prefixIn, restGo, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = w.Write(body)
	})
	c := &committed{blobs: map[digest.Digest][]byte{}}
	m, err := NewManager(filepath.Join(dir, "spool"), c.commit, parallelOpts(3)...)
	if err != nil {
		t.Fatal(err)
	}
	key := Key{"r", digest.FromBytes(body)}
	f, _ := m.Join(key, "o", getAs(o.URL, "first"))
	defer f.Release()
	whole := f.NewReader(context.Background(), 0, -1)
	if got, err := io.ReadAll(f.NewRangeReader(context.Background(), 0, firstBytes)); err != nil || len(got) != firstBytes {
		t.Fatalf("first bytes: %v", err)
	}
	close(prefixIn)
	close(restGo) // a reader has bytes: the rest is asked for after
	got, err := io.ReadAll(whole)
	if !errors.Is(err, ErrFailed) || !strings.Contains(err.Error(), "ignored the range") {
		t.Fatalf("reader: %d bytes, %v; want ErrFailed, the origin ignored the range", len(got), err)
	}
	<-f.Settled()
	if _, ok := c.get(key.Digest); ok {
		t.Fatal("stored a blob whose fill failed")
	}
}

// patternBlob is a blob of size bytes, each a function of its offset: an origin serves
// it with ranges honoured without holding it in memory.
type patternBlob struct{ size int64 }

func (b patternBlob) ReadAt(p []byte, off int64) (int, error) {
	if off >= b.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), b.size-off))
	for i := range n {
		p[i] = byte((uint64(off+int64(i)) * 0x9E3779B97F4A7C15) >> 56)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// A 96 MiB blob fetched in ranges whose spool (a 1 MiB tmpfs) fails passes through to
// two readers with the heap within the window's order, not the blob's.
func TestParallelSpoolFullMemoryBounded(t *testing.T) {
	dir := peers.MountTmpfs(t, "size=1m")
	const size = 96 << 20
	blob := patternBlob{size}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(blob, 0, size)); err != nil {
		t.Fatal(err)
	}
	d := digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil))
	var o *rangeOrigin
	o = startRangeOrigin(t, nil, func(w http.ResponseWriter, r *http.Request) bool {
		if r.Header.Get("Range") != "" {
			http.ServeContent(w, r, "", time.Time{}, io.NewSectionReader(blob, 0, size))
			return true
		}
		// A whole body's bytes wait until a range was asked for: the fill is in ranges
		// whatever the machine's pace.
		w.Header().Set("Content-Length", strconv.Itoa(size))
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		for o.ranged() == 0 && r.Context().Err() == nil {
			time.Sleep(time.Millisecond)
		}
		_, _ = io.Copy(w, io.NewSectionReader(blob, 0, size))
		return true
	})
	c := &committed{blobs: map[digest.Digest][]byte{}}
	m, err := NewManager(filepath.Join(dir, "spool"), c.commit, append(parallelOpts(4), WithPassThroughWindow(4<<20))...)
	if err != nil {
		t.Fatal(err)
	}
	heapGrowth := sampleHeap()
	f, _ := m.Join(Key{"r", d}, "o", get(o.URL))
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v := d.Verifier()
			n, err := io.Copy(v, f.NewReader(context.Background(), 0, -1))
			if err != nil || n != size || !v.Verified() {
				t.Errorf("reader %d: %d bytes, %v, verified %v", i, n, err, v.Verified())
			}
		}()
	}
	wg.Wait()
	grew := heapGrowth()
	<-f.Settled()
	f.Release()
	if !f.PassingThrough() {
		t.Fatal("fill did not pass its blob through")
	}
	if _, ok := c.get(d); ok {
		t.Fatal("stored a blob whose spool failed")
	}
	// The rest is "bytes=P-", or a plain GET when the spool failed before its first byte.
	whole, bounded, rest := 0, 0, 0
	for _, q := range o.requests() {
		switch {
		case q.rng == "":
			whole++
		case strings.HasSuffix(q.rng, "-"):
			rest++
		default:
			bounded++
		}
	}
	if bounded == 0 || whole+rest != 2 {
		t.Fatalf("origin saw %v: want ranges, then one request for the rest", o.requests())
	}
	t.Logf("heap grew by at most %.1f MiB passing %d MiB through to 2 readers after ranges", float64(grew)/(1<<20), size>>20)
	if grew > 24<<20 {
		t.Fatalf("heap grew by %d MiB passing a %d MiB blob through: not bounded by the window", grew>>20, size>>20)
	}
}
