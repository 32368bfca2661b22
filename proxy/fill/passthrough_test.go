package fill

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// events records what a Manager reports.
type events struct {
	mu         sync.Mutex
	storeErrs  []string // op/reason
	passed     []string
	cut        int
	conditions []bool
}

func (e *events) hooks() Events {
	return Events{
		StoreError: func(op, reason string) {
			e.mu.Lock()
			e.storeErrs = append(e.storeErrs, op+"/"+reason)
			e.mu.Unlock()
		},
		PassThrough: func(reason string) {
			e.mu.Lock()
			e.passed = append(e.passed, reason)
			e.mu.Unlock()
		},
		ReaderCut: func() {
			e.mu.Lock()
			e.cut++
			e.mu.Unlock()
		},
		Condition: func(degraded bool) {
			e.mu.Lock()
			e.conditions = append(e.conditions, degraded)
			e.mu.Unlock()
		},
	}
}

func (e *events) snapshot() (storeErrs, passed []string, cut int, conditions []bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.storeErrs...), append([]string(nil), e.passed...), e.cut, append([]bool(nil), e.conditions...)
}

// reservations is a ReserveFunc that refuses while refuse is set and records releases.
type reservations struct {
	refuse   atomic.Bool
	mu       sync.Mutex
	sizes    []int64
	released []bool
}

func (rs *reservations) reserve(_ context.Context, _ Key, size int64) (func(bool), error) {
	rs.mu.Lock()
	rs.sizes = append(rs.sizes, size)
	rs.mu.Unlock()
	if rs.refuse.Load() {
		return nil, errors.New("store bound reached")
	}
	var once atomic.Bool
	return func(stored bool) {
		if !once.CompareAndSwap(false, true) {
			panic("release called twice")
		}
		rs.mu.Lock()
		rs.released = append(rs.released, stored)
		rs.mu.Unlock()
	}, nil
}

func (rs *reservations) get() ([]int64, []bool) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	return append([]int64(nil), rs.sizes...), append([]bool(nil), rs.released...)
}

func readAll(f *Fill, off, n int64) ([]byte, error) {
	var buf bytes.Buffer
	_, err := io.Copy(&buf, f.NewReader(context.Background(), off, n))
	return buf.Bytes(), err
}

// A refused reservation passes the blob through: every reader gets it whole and
// verified, nothing is stored, and the next fill, reserved, is stored again.
func TestReserveRefusedPassesThrough(t *testing.T) {
	body := randomBytes(t, 3<<20+17)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, nil)
	var rs reservations
	rs.refuse.Store(true)
	var ev events
	m, c, dir := newManager(t, WithReserve(rs.reserve), WithEvents(ev.hooks()), WithPassThroughWindow(1<<20))
	key := Key{Registry: "r", Digest: d}

	f, _ := m.Join(key, "o", get(origin.URL))
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var got []byte
			var err error
			if i == 0 {
				got, err = io.ReadAll(f.NewReader(context.Background(), 0, -1)) // Read, not WriteTo
			} else {
				got, err = readAll(f, 0, int64(len(body)))
			}
			if err != nil || !bytes.Equal(got, body) {
				t.Errorf("reader %d: %v, %d bytes, equal %v", i, err, len(got), bytes.Equal(got, body))
			}
		}()
	}
	wg.Wait()
	if !f.PassingThrough() {
		t.Error("fill not passing through")
	}
	f.Release()
	waitGone(t, m)
	if _, ok := c.get(d); ok {
		t.Fatal("a blob whose reservation was refused was stored")
	}
	assertSpoolEmpty(t, dir)
	if cond, degraded := m.StoreDegraded(); !degraded || cond.Op != "reserve" || cond.Reason != ReasonReserveRefused {
		t.Fatalf("StoreDegraded = %+v, %v", cond, degraded)
	}
	sizes, released := rs.get()
	if len(sizes) != 1 || sizes[0] != int64(len(body)) || len(released) != 0 {
		t.Fatalf("reserve sizes %v, releases %v", sizes, released)
	}

	// Room again: the next fill stores, and the condition ends.
	rs.refuse.Store(false)
	f, started := m.Join(key, "o", get(origin.URL))
	if !started {
		t.Fatal("a pass-through fill that ended was joined")
	}
	if got, err := readAll(f, 0, -1); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read: %v", err)
	}
	f.Release()
	waitGone(t, m)
	if b, ok := c.get(d); !ok || !bytes.Equal(b, body) {
		t.Fatal("not stored once the reservation was granted")
	}
	if _, degraded := m.StoreDegraded(); degraded {
		t.Fatal("still degraded after a blob was stored")
	}
	if _, released = rs.get(); len(released) != 1 || !released[0] {
		t.Fatalf("releases = %v, want [true]", released)
	}
	_, passed, _, conditions := ev.snapshot()
	if fmt.Sprint(passed) != "[reserve_refused]" || fmt.Sprint(conditions) != "[true false]" {
		t.Fatalf("passed through %v, conditions %v", passed, conditions)
	}
	if calls.Load() != 2 {
		t.Fatalf("origin calls = %d, want 2", calls.Load())
	}
}

// A granted reservation whose fill fails is released once, not stored.
func TestReserveReleasedOnFailedFill(t *testing.T) {
	body := randomBytes(t, 1<<20)
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, func(b []byte) []byte { b[10] ^= 1; return b })
	var rs reservations
	m, _, _ := newManager(t, WithReserve(rs.reserve))
	f, _ := m.Join(Key{Registry: "r", Digest: digest.FromBytes(body)}, "o", get(origin.URL))
	if _, err := readAll(f, 0, -1); !errors.Is(err, ErrFailed) {
		t.Fatalf("read: %v", err)
	}
	<-f.Settled()
	f.Release()
	if _, released := rs.get(); fmt.Sprint(released) != "[false]" {
		t.Fatalf("releases = %v, want [false]", released)
	}
}

// A reader that stops reading is cut off once it falls behind the window (after the
// lag); the others get the whole body. A new request from byte 0, no longer in the
// window, starts a fresh fill; one from a byte still ahead joins.
func TestWindowCutsOffStalledReader(t *testing.T) {
	body := randomBytes(t, 4<<20)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	// The origin sends the next 64 KiB only once the reader that keeps up has read the
	// previous ones: that reader is never behind when the fill overwrites the window,
	// however late the machine schedules it (with a free-running origin, a reader
	// descheduled for the lag under load was cut off too), and only the stalled one is.
	const chunk = 64 << 10
	next := make(chan struct{}, 1)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		for off := 0; off < len(body); off += chunk {
			if off > 0 {
				select {
				case <-next:
				case <-r.Context().Done():
					return
				}
			}
			if _, err := w.Write(body[off:min(off+chunk, len(body))]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
		}
	}))
	t.Cleanup(origin.Close)
	var rs reservations
	rs.refuse.Store(true)
	var ev events
	m, _, _ := newManager(t, WithReserve(rs.reserve), WithEvents(ev.hooks()),
		WithPassThroughWindow(256<<10), WithPassThroughLag(100*time.Millisecond))
	key := Key{Registry: "r", Digest: d}
	f, _ := m.Join(key, "o", get(origin.URL))
	defer f.Release()

	// Both readers are there from the start: a reader made later could find byte 0
	// gone from the window already.
	stalled := f.NewReader(context.Background(), 0, -1)
	// A fill that never cut the stalled reader off would wait for it forever: the
	// context turns that hang into a failure.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	keeping := f.NewReader(ctx, 0, -1)
	if _, err := io.ReadFull(stalled, make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	var got []byte
	for len(got) < len(body) {
		// The last byte is withheld until the blob verifies: read what is due of this chunk.
		want := min(chunk, len(body)-len(got))
		buf := make([]byte, want)
		n, err := io.ReadFull(keeping, buf)
		got = append(got, buf[:n]...)
		if err != nil {
			t.Fatalf("reader that kept up, after %d bytes: %v", len(got), err)
		}
		next <- struct{}{}
	}
	if rest, err := io.ReadAll(keeping); err != nil || len(rest) != 0 || !bytes.Equal(got, body) {
		t.Fatalf("reader that kept up: %v, %d bytes past the body, equal %v", err, len(rest), bytes.Equal(got, body))
	}
	if _, err := io.ReadAll(stalled); !errors.Is(err, ErrBehind) || errors.Is(err, ErrFailed) {
		t.Fatalf("stalled reader: %v, want ErrBehind", err)
	}
	if _, _, cut, _ := ev.snapshot(); cut != 1 {
		t.Fatalf("cut off %d readers, want 1", cut)
	}
	if calls.Load() != 1 {
		t.Fatalf("origin calls = %d, want 1", calls.Load())
	}
}

func TestJoinAtPassThroughWindow(t *testing.T) {
	body := randomBytes(t, 4<<20)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	release := make(chan struct{})
	half := len(body) / 2
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body[:half])
		w.(http.Flusher).Flush()
		<-release
		w.Write(body[half:])
	}))
	defer origin.Close()
	var rs reservations
	rs.refuse.Store(true)
	m, _, _ := newManager(t, WithReserve(rs.reserve), WithPassThroughWindow(256<<10))
	key := Key{Registry: "r", Digest: d}
	f, _ := m.Join(key, "o", get(origin.URL))
	defer f.Release()
	// Wait until the first half went through (no reader holds the window back).
	if _, err := io.ReadFull(f.NewReader(context.Background(), int64(half)-1000, 999), make([]byte, 999)); err != nil {
		t.Fatal(err)
	}
	ahead, started := m.JoinAt(key, "o", int64(half)-1000, get(origin.URL))
	if started || ahead != f {
		t.Fatal("a reader from a byte still in the window did not join")
	}
	if l := m.Lookup(key); l != nil {
		l.Release()
		t.Fatal("Lookup returned a pass-through fill that no longer has byte 0")
	}
	fresh, started := m.JoinAt(key, "o", 0, get(origin.URL))
	if !started || fresh == f {
		t.Fatal("a reader from a byte out of the window joined")
	}
	close(release)
	for name, rd := range map[string]io.Reader{
		"ahead": ahead.NewReader(context.Background(), int64(half)-1000, -1),
		"fresh": fresh.NewReader(context.Background(), 0, -1),
	} {
		got, err := io.ReadAll(rd)
		want := body
		if name == "ahead" {
			want = body[half-1000:]
		}
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: %v, equal %v", name, err, bytes.Equal(got, want))
		}
	}
	ahead.Release()
	fresh.Release()
	if calls.Load() != 2 {
		t.Fatalf("origin calls = %d, want 2", calls.Load())
	}
}

// A reader slower than the origin but moving is waited for, not cut off: one origin
// fetch, every byte delivered.
func TestWindowWaitsForSlowReader(t *testing.T) {
	body := randomBytes(t, 2<<20)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, nil)
	var rs reservations
	rs.refuse.Store(true)
	m, _, _ := newManager(t, WithReserve(rs.reserve), WithPassThroughWindow(128<<10), WithPassThroughLag(2*time.Second))
	f, _ := m.Join(Key{Registry: "r", Digest: d}, "o", get(origin.URL))
	defer f.Release()
	rd := f.NewReader(context.Background(), 0, -1)
	var got []byte
	buf := make([]byte, 32<<10)
	for {
		n, err := rd.Read(buf)
		got = append(got, buf[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("slow reader after %d bytes: %v", len(got), err)
		}
		time.Sleep(2 * time.Millisecond)
	}
	if !bytes.Equal(got, body) || calls.Load() != 1 {
		t.Fatalf("equal %v, origin calls %d", bytes.Equal(got, body), calls.Load())
	}
}

// streamOrigin serves size bytes of a seeded pseudo-random stream without holding them.
func streamOrigin(t *testing.T, seed uint64, size int64, calls *atomic.Int32) (*httptest.Server, digest.Digest) {
	gen := func(w io.Writer) error {
		rng := rand.NewChaCha8([32]byte{byte(seed)})
		buf := make([]byte, 256<<10)
		for left := size; left > 0; {
			n := min(int64(len(buf)), left)
			rng.Read(buf[:n])
			if _, err := w.Write(buf[:n]); err != nil {
				return err
			}
			left -= n
		}
		return nil
	}
	h := sha256.New()
	_ = gen(h)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		_ = gen(w)
	}))
	t.Cleanup(srv.Close)
	return srv, digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil))
}

// sampleHeap samples the heap every 10 ms from now (after a GC) until the function it
// returns is called, which returns how much the heap grew at most.
func sampleHeap() func() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc
	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapAlloc > peak.Load() {
				peak.Store(ms.HeapAlloc)
			}
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	return func() int64 {
		close(stop)
		<-sampled
		return int64(peak.Load()) - int64(base)
	}
}

// A pass-through fill of a 192 MiB blob read by three clients (and one that stops and
// is cut off) keeps the heap within the window's order, not the blob's.
func TestPassThroughMemoryBounded(t *testing.T) {
	const size = 192 << 20
	var calls atomic.Int32
	origin, d := streamOrigin(t, 7, size, &calls)
	var rs reservations
	rs.refuse.Store(true)
	m, c, _ := newManager(t, WithReserve(rs.reserve), WithPassThroughWindow(4<<20), WithPassThroughLag(200*time.Millisecond))

	heapGrowth := sampleHeap()
	f, _ := m.Join(Key{Registry: "r", Digest: d}, "o", get(origin.URL))
	stalled := f.NewReader(context.Background(), 0, -1)
	if _, err := io.ReadFull(stalled, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := d.Verifier()
			n, err := io.Copy(h, f.NewReader(context.Background(), 0, -1))
			if err != nil || n != size || !h.Verified() {
				t.Errorf("reader %d: %d bytes, %v, verified %v", i, n, err, h.Verified())
			}
		}()
	}
	wg.Wait()
	grew := heapGrowth()
	f.Release()
	waitGone(t, m)
	if _, err := stalled.Read(make([]byte, 1)); !errors.Is(err, ErrBehind) {
		t.Errorf("stalled reader: %v, want ErrBehind", err)
	}
	t.Logf("heap grew by at most %.1f MiB while passing %d MiB through to 3 readers", float64(grew)/(1<<20), size>>20)
	if grew > 24<<20 {
		t.Fatalf("heap grew by %d MiB passing a %d MiB blob through: not bounded by the window", grew>>20, size>>20)
	}
	if _, ok := c.get(d); ok || calls.Load() != 1 {
		t.Fatalf("stored %v, origin calls %d", ok, calls.Load())
	}
}

// A caller that joined a pass-through fill and has not made its reader yet (it waits
// for the origin's answer, or asks the origin whether it may read) keeps its place: the
// window waits for it instead of running past the byte it will read from.
func TestJoinerHeldUntilItReads(t *testing.T) {
	body := randomBytes(t, 4<<20)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, nil)
	var rs reservations
	rs.refuse.Store(true)
	var ev events
	m, _, _ := newManager(t, WithReserve(rs.reserve), WithEvents(ev.hooks()),
		WithPassThroughWindow(256<<10), WithPassThroughLag(2*time.Second))
	f, _ := m.Join(Key{Registry: "r", Digest: d}, "o", get(origin.URL))
	defer f.Release()
	if _, err := f.Response(context.Background()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond) // the origin could have sent the window 5 times over
	got, err := readAll(f, 0, -1)
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("a joiner that read late: %v, equal %v", err, bytes.Equal(got, body))
	}
	if _, _, cut, _ := ev.snapshot(); cut != 0 || calls.Load() != 1 {
		t.Fatalf("cut %d, origin calls %d", cut, calls.Load())
	}
}

// A store that has room for small blobs only: storing a small one does not end the
// condition a large one started; storing one as large does.
func TestConditionOutlastsSmallBlobs(t *testing.T) {
	large, small := randomBytes(t, 2<<20), randomBytes(t, 10<<10)
	var calls atomic.Int32
	oLarge, oSmall := slowOrigin(t, large, &calls, nil), slowOrigin(t, small, &calls, nil)
	var room atomic.Int64
	room.Store(1 << 20)
	reserve := func(_ context.Context, _ Key, size int64) (func(bool), error) {
		if size > room.Load() {
			return nil, errors.New("no room")
		}
		return func(bool) {}, nil
	}
	var ev events
	m, c, _ := newManager(t, WithReserve(reserve), WithEvents(ev.hooks()))
	fill := func(body []byte, url string) {
		f, _ := m.Join(Key{Registry: "r", Digest: digest.FromBytes(body)}, "o", get(url))
		if got, err := readAll(f, 0, -1); err != nil || !bytes.Equal(got, body) {
			t.Fatalf("read: %v", err)
		}
		<-f.Settled()
		f.Release()
	}
	fill(large, oLarge.URL)
	fill(small, oSmall.URL)
	if _, ok := c.get(digest.FromBytes(small)); !ok {
		t.Fatal("small blob not stored")
	}
	if _, degraded := m.StoreDegraded(); !degraded {
		t.Fatal("a small blob stored ended the condition a large one started")
	}
	room.Store(4 << 20)
	fill(large, oLarge.URL)
	if _, degraded := m.StoreDegraded(); degraded {
		t.Fatal("still degraded after the large blob was stored")
	}
	if _, _, _, conditions := ev.snapshot(); fmt.Sprint(conditions) != "[true false]" {
		t.Fatalf("conditions %v, want [true false]", conditions)
	}
}
