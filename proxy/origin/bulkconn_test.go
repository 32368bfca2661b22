package origin

import (
	"bytes"
	"crypto/sha256"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
)

// readSizes is a request body that records the size of every read asked of it.
type readSizes struct {
	r   io.Reader
	max int
}

func (s *readSizes) Read(p []byte) (int, error) {
	s.max = max(s.max, len(p))
	return s.r.Read(p)
}

// postThrough posts body to a server that hashes what it receives, with a transport
// whose connections are dialed by NewTransport, and returns the server's digest.
func postThrough(t *testing.T, body io.Reader, length int64) [32]byte {
	t.Helper()
	got := make(chan [32]byte, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		_, _ = io.Copy(h, r.Body)
		var sum [32]byte
		copy(sum[:], h.Sum(nil))
		got <- sum
	}))
	defer srv.Close()
	tr := NewTransport()
	defer tr.CloseIdleConnections()
	req, err := http.NewRequest(http.MethodPut, srv.URL, body)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = length
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return <-got
}

// A streamed request body goes to a plain origin in reads of bulkWrite, not net/http's
// 32 KiB, and arrives whole.
func TestBulkConnSendsBodiesInLargeWrites(t *testing.T) {
	data := bytes.Repeat([]byte("cove bulk write "), 3<<20/16)
	body := &readSizes{r: bytes.NewReader(data)}
	if got := postThrough(t, body, int64(len(data))); got != sha256.Sum256(data) {
		t.Fatal("the origin received other bytes than were sent")
	}
	if body.max != bulkWrite {
		t.Fatalf("the body was read at most %d bytes at a time, want %d", body.max, bulkWrite)
	}
}

// A body that is a file keeps the kernel's copy (sendfile) and arrives whole.
func TestBulkConnFileBody(t *testing.T) {
	data := bytes.Repeat([]byte{7, 1, 3}, 1<<20)
	path := filepath.Join(t.TempDir(), "body")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !isFile(io.LimitReader(f, 10)) {
		t.Fatal("a limited file is not recognised as one the kernel can send")
	}
	if got := postThrough(t, f, int64(len(data))); got != sha256.Sum256(data) {
		t.Fatal("the origin received other bytes than were sent")
	}
}
