package fill

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// A slow origin trickling small pieces is not stalled while it sends, though a round
// waits for much more than the stall timeout's worth of its bytes, and readers get its
// bytes a round wait after they arrive, not once a round's worth has come.
func TestTricklingOriginIsNotStalledAndStreams(t *testing.T) {
	body := randomBytes(t, 40<<10)
	d := digest.FromBytes(body)
	const piece = 1 << 10
	const pause = 15 * time.Millisecond // 40 pieces: 0.6 s in all, 4 stall timeouts
	first := make(chan time.Time, 1)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusOK)
		for off := 0; off < len(body); off += piece {
			if _, err := w.Write(body[off : off+piece]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			if off == 0 {
				first <- time.Now()
			}
			time.Sleep(pause)
		}
	}))
	defer origin.Close()
	m, c, _ := newManager(t, WithStallTimeout(150*time.Millisecond))
	f, _ := m.Join(Key{Registry: "r", Digest: d}, "o", get(origin.URL))
	r := f.NewReader(context.Background(), 0, -1)
	one := make([]byte, 1)
	if _, err := io.ReadFull(r, one); err != nil {
		t.Fatal(err)
	}
	if lag := time.Since(<-first); lag > 100*time.Millisecond {
		t.Errorf("first byte reached the reader %s after the origin sent it", lag)
	}
	rest, err := io.ReadAll(r)
	f.Release()
	if err != nil || !bytes.Equal(append(one, rest...), body) {
		t.Fatalf("read: %v, equal=%v", err, bytes.Equal(append(one, rest...), body))
	}
	waitGone(t, m)
	if _, ok := c.get(d); !ok {
		t.Fatal("not committed")
	}
}
