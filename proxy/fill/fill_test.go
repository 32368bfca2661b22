package fill

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

type committed struct {
	mu    sync.Mutex
	blobs map[digest.Digest][]byte
}

func (c *committed) commit(_ context.Context, f *Fill, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.blobs[f.Key.Digest] = b
	return nil
}

func (c *committed) get(d digest.Digest) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	b, ok := c.blobs[d]
	return b, ok
}

func newManager(t *testing.T, opts ...Option) (*Manager, *committed, string) {
	t.Helper()
	c := &committed{blobs: map[digest.Digest][]byte{}}
	dir := t.TempDir()
	m, err := NewManager(dir, c.commit, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return m, c, dir
}

func randomBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// slowOrigin serves body in chunks with a pause, so readers really join mid-fill.
func slowOrigin(t *testing.T, body []byte, calls *atomic.Int32, mangle func([]byte) []byte) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		out := body
		if mangle != nil {
			out = mangle(append([]byte(nil), body...))
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusOK)
		for off := 0; off < len(out); off += 64 << 10 {
			end := min(off+64<<10, len(out))
			if _, err := w.Write(out[off:end]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			time.Sleep(2 * time.Millisecond)
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func get(url string) FetchFunc {
	return func(ctx context.Context, from, to int64) (*http.Response, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		for k, v := range RangeHeader(from, to) {
			req.Header[k] = v
		}
		return http.DefaultClient.Do(req)
	}
}

func waitGone(t *testing.T, m *Manager) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for m.InFlight() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("fill never ended")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestOneFetchManyReaders(t *testing.T) {
	body := randomBytes(t, 2<<20+123)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, nil)
	m, c, dir := newManager(t)
	key := Key{Registry: "r.example", Digest: d}

	ranges := [][2]int64{{0, -1}, {0, -1}, {1000, 5000}, {int64(len(body)) - 10, 10}, {1 << 20, 1 << 20}, {0, 1}}
	var wg sync.WaitGroup
	errs := make(chan error, len(ranges))
	for i, rg := range ranges {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i) * 3 * time.Millisecond) // some join mid-fill
			f, _ := m.Join(key, "owner", get(origin.URL))
			defer f.Release()
			resp, err := f.Response(context.Background())
			if err != nil || resp.Status != 200 {
				errs <- errors.New("no 200 response")
				return
			}
			// Half the readers Read, half stream with WriteTo (the server's path).
			var got []byte
			if i%2 == 0 {
				got, err = io.ReadAll(f.NewReader(context.Background(), rg[0], rg[1]))
			} else {
				var buf bytes.Buffer
				_, err = io.Copy(&buf, f.NewReader(context.Background(), rg[0], rg[1]))
				got = buf.Bytes()
			}
			if err != nil {
				errs <- err
				return
			}
			want := body[rg[0]:]
			if rg[1] >= 0 {
				want = body[rg[0] : rg[0]+rg[1]]
			}
			if !bytes.Equal(got, want) {
				errs <- errors.New("range content differs")
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	waitGone(t, m)
	if n := calls.Load(); n != 1 {
		t.Fatalf("origin fetched %d times, want 1", n)
	}
	if b, ok := c.get(d); !ok || !bytes.Equal(b, body) {
		t.Fatal("verified blob not committed")
	}
	assertSpoolEmpty(t, dir)
}

func assertSpoolEmpty(t *testing.T, dir string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		entries, _ := os.ReadDir(dir)
		if len(entries) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("spool not cleaned: %d entries", len(entries))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A corrupt or truncated body must never reach a reader whole: the last byte is withheld
// until verification, and the read ends in an error.
func TestCorruptBodiesNeverServedWhole(t *testing.T) {
	body := randomBytes(t, 1<<20)
	d := digest.FromBytes(body)
	cases := map[string]func([]byte) []byte{
		"wrong last byte":  func(b []byte) []byte { b[len(b)-1] ^= 0xff; return b },
		"wrong first byte": func(b []byte) []byte { b[0] ^= 0xff; return b },
		"truncated":        func(b []byte) []byte { return b[:len(b)/2] },
	}
	for name, mangle := range cases {
		t.Run(name, func(t *testing.T) {
			var calls atomic.Int32
			origin := slowOrigin(t, body, &calls, mangle)
			m, c, dir := newManager(t)
			f, started := m.Join(Key{Registry: "r", Digest: d}, "o", get(origin.URL))
			if !started {
				t.Fatal("first Join did not start a fill")
			}
			var buf bytes.Buffer
			_, err := io.Copy(&buf, f.NewReader(context.Background(), 0, int64(len(body))))
			got := buf.Bytes()
			f.Release()
			if !errors.Is(err, ErrFailed) {
				t.Fatalf("read error = %v, want ErrFailed", err)
			}
			if len(got) >= len(body) {
				t.Fatalf("reader got %d bytes of a corrupt %d-byte body", len(got), len(body))
			}
			waitGone(t, m)
			if _, ok := c.get(d); ok {
				t.Fatal("corrupt blob committed")
			}
			assertSpoolEmpty(t, dir)
			// The next request fetches again.
			f2, started := m.Join(Key{Registry: "r", Digest: d}, "o", get(origin.URL))
			f2.Release()
			if !started {
				t.Fatal("a failed fill was joined instead of retried")
			}
			waitGone(t, m)
		})
	}
}

func TestRefusedFillRelaysOriginAnswer(t *testing.T) {
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Www-Authenticate", `Bearer realm="https://auth.example/token"`)
		w.WriteHeader(http.StatusUnauthorized)
		io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`)
	}))
	defer origin.Close()
	m, c, _ := newManager(t)
	d := digest.FromString("x")
	f, _ := m.Join(Key{Registry: "r", Digest: d}, "o", get(origin.URL))
	defer f.Release()
	resp, err := f.Response(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Status != 401 || resp.Header.Get("Www-Authenticate") == "" || !bytes.Contains(resp.Body, []byte("UNAUTHORIZED")) {
		t.Fatalf("response = %+v", resp)
	}
	if _, err := f.Done(); !errors.Is(err, ErrRefused) {
		t.Fatalf("Done error = %v, want ErrRefused", err)
	}
	if m.InFlight() != 0 {
		t.Fatal("refused fill still joinable")
	}
	if len(c.blobs) != 0 {
		t.Fatal("refused fill committed")
	}
}

func TestClientCancelDoesNotCancelFill(t *testing.T) {
	body := randomBytes(t, 1<<20)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, nil)
	m, c, _ := newManager(t)
	ctx, cancel := context.WithCancel(context.Background())
	f, _ := m.Join(Key{Registry: "r", Digest: d}, "o", get(origin.URL))
	buf := make([]byte, 1000)
	if _, err := f.NewReader(ctx, 0, -1).Read(buf); err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := io.ReadAll(f.NewReader(ctx, 0, -1)); !errors.Is(err, context.Canceled) {
		t.Fatalf("read after cancel: %v", err)
	}
	f.Release()
	waitGone(t, m)
	if b, ok := c.get(d); !ok || !bytes.Equal(b, body) {
		t.Fatal("fill did not complete after its only client left")
	}
}

func TestStalledOriginFails(t *testing.T) {
	release := make(chan struct{})
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(200)
		w.Write(make([]byte, 10))
		w.(http.Flusher).Flush()
		<-release
	}))
	defer origin.Close()
	defer close(release)
	m, _, _ := newManager(t, WithStallTimeout(200*time.Millisecond))
	f, _ := m.Join(Key{Registry: "r", Digest: digest.FromString("y")}, "o", get(origin.URL))
	defer f.Release()
	_, err := io.ReadAll(f.NewReader(context.Background(), 0, 1000))
	if !errors.Is(err, ErrFailed) {
		t.Fatalf("read from stalled fill: %v", err)
	}
}

func TestUnknownLength(t *testing.T) {
	body := randomBytes(t, 300<<10)
	d := digest.FromBytes(body)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// No Content-Length: chunked encoding.
		for off := 0; off < len(body); off += 100 << 10 {
			w.Write(body[off:min(off+100<<10, len(body))])
			w.(http.Flusher).Flush()
		}
	}))
	defer origin.Close()
	m, c, _ := newManager(t)
	f, _ := m.Join(Key{Registry: "r", Digest: d}, "o", get(origin.URL))
	got, err := io.ReadAll(f.NewReader(context.Background(), 0, -1))
	f.Release()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read: %v, equal=%v", err, bytes.Equal(got, body))
	}
	waitGone(t, m)
	if _, ok := c.get(d); !ok {
		t.Fatal("not committed")
	}
}

func TestConnectionRefused(t *testing.T) {
	origin := httptest.NewServer(http.NotFoundHandler())
	url := origin.URL
	origin.Close()
	m, _, _ := newManager(t)
	f, _ := m.Join(Key{Registry: "r", Digest: digest.FromString("z")}, "o", get(url))
	defer f.Release()
	if _, err := f.Response(context.Background()); !errors.Is(err, ErrFailed) {
		t.Fatalf("Response: %v", err)
	}
}

// A hook the commit registers with OnClose runs only once the last client has released
// the fill (its spool closed), not at commit; registered after that, it runs at once.
func TestOnCloseRunsAfterTheLastReader(t *testing.T) {
	body := randomBytes(t, 1<<20)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, nil)
	var closed atomic.Int32
	var fills = make(chan *Fill, 1)
	commit := func(_ context.Context, f *Fill, path string) error {
		f.OnClose(func() { closed.Add(1) })
		fills <- f
		return nil
	}
	m, err := NewManager(t.TempDir(), commit)
	if err != nil {
		t.Fatal(err)
	}
	f, _ := m.Join(Key{Registry: "r.example", Digest: d}, "owner", get(origin.URL))
	if _, err := f.Response(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Read to the end: the fill commits and ends while this client still holds it.
	if got, err := io.ReadAll(f.NewReader(context.Background(), 0, -1)); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read: %v", err)
	}
	<-f.Settled()
	<-fills
	if n := closed.Load(); n != 0 {
		t.Fatalf("OnClose ran %d times while a client still held the fill", n)
	}
	f.Release()
	if n := closed.Load(); n != 1 {
		t.Fatalf("OnClose ran %d times after the last release, want 1", n)
	}
	f.OnClose(func() { closed.Add(1) })
	if n := closed.Load(); n != 2 {
		t.Fatal("OnClose registered after the spool closed did not run at once")
	}
}
