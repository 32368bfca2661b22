package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

// A 256 MiB blob, cold, through cove-cache in front of a distribution registry whose
// every connection is slow (a WAN): cove-cache fetches it in parallel ranges, a client's
// range far ahead of the fill is fetched for it at once and served before the fill gets
// there, a client reading the whole blob gets it right, and the stored blob verifies.
func TestParallelFillColdLargeBlob(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/model:v1", 1, 256<<20)
	layer := digest.Digest(img.Layers[0])
	slow := throttle(t, origin.URL, 24<<20) // per connection: ~11 s for the blob in one stream
	cove := peers.StartCove(t, "", "--origin-plain-http", slow, "--log-level", "debug",
		"--fill-parallel", "4", "--fill-range-size", "16MiB", "--fill-parallel-min", "64MiB")
	from := len(origin.Requests())
	blobURL := cove.URL + "/v2/team/model/blobs/" + layer.String() + "?ns=" + url.QueryEscape(slow)

	// A client reads the whole blob, counting what it has.
	type result struct {
		sum string
		n   int64
		err error
	}
	var whole countingWriter
	wholeDone := make(chan result, 1)
	go func() {
		resp, err := http.Get(blobURL)
		if err != nil {
			wholeDone <- result{err: err}
			return
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			wholeDone <- result{err: fmt.Errorf("status %d", resp.StatusCode)}
			return
		}
		h := sha256.New()
		n, err := io.Copy(io.MultiWriter(h, &whole), resp.Body)
		wholeDone <- result{sum: "sha256:" + hex.EncodeToString(h.Sum(nil)), n: n, err: err}
	}()

	// Meanwhile a lazy puller reads 64 KiB at 200 MiB, far ahead of the fill.
	const aheadAt, aheadLen = 200 << 20, 64 << 10
	req, _ := http.NewRequest(http.MethodGet, blobURL, nil)
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", aheadAt, aheadAt+aheadLen-1))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	ahead, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusPartialContent || len(ahead) != aheadLen {
		t.Fatalf("ahead range: status %d, %d bytes, err %v", resp.StatusCode, len(ahead), err)
	}
	if had := whole.count(); had >= aheadAt {
		t.Fatalf("the whole-blob client had %d bytes when the range at %d came: not served ahead", had, aheadAt)
	} else {
		t.Logf("range at 200 MiB served while the whole-blob client had %.1f MiB", float64(had)/(1<<20))
	}

	start := time.Now()
	r := <-wholeDone
	if r.err != nil || r.sum != layer.String() || r.n != img.Size {
		t.Fatalf("whole blob: %d bytes, %s, err %v", r.n, r.sum, r.err)
	}
	t.Logf("whole blob done %s after the ahead range", time.Since(start).Round(time.Millisecond))

	// The stored blob verifies.
	deadline := time.Now().Add(60 * time.Second)
	for cove.Metric(t, "cove_fills_in_flight") > 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got, err := fileDigest(filepath.Join(cove.StorageDir, "blobs", "sha256", layer.Encoded())); err != nil || got != layer {
		t.Fatalf("stored blob: digest %s, error %v", got, err)
	}

	// The origin saw the whole-body GET and several ranged GETs of the blob.
	whole200, ranged := 0, 0
	for _, q := range origin.Requests()[from:] {
		if q.Method != http.MethodGet || !strings.HasSuffix(q.Path, "/blobs/"+layer.String()) {
			continue
		}
		switch q.Status {
		case http.StatusOK:
			whole200++
		case http.StatusPartialContent:
			ranged++
		}
	}
	if whole200 != 1 || ranged < 4 {
		t.Fatalf("origin blob GETs: %d whole, %d ranged; want 1 whole and several ranged", whole200, ranged)
	}
	t.Logf("origin blob GETs: 1 whole, %d ranged", ranged)

	// The range's bytes are the blob's (asked of the origin itself).
	req, _ = http.NewRequest(http.MethodGet, origin.URL+"/v2/team/model/blobs/"+layer.String(), nil)
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", aheadAt, aheadAt+aheadLen-1))
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !bytes.Equal(ahead, want) {
		t.Fatal("the ahead range's bytes differ from the origin's")
	}

	aheadLogged := false
	for _, l := range cove.Logs(t) {
		if l["msg"] == "fetching a range ahead of the fill for a reader" && l["from"] == float64(aheadAt) {
			aheadLogged = true
		}
	}
	if !aheadLogged {
		t.Fatal("cove-cache did not fetch the range ahead for its reader")
	}
}

// countingWriter counts the bytes written to it, readable from another goroutine.
type countingWriter struct {
	mu sync.Mutex
	n  int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.n += int64(len(p))
	c.mu.Unlock()
	return len(p), nil
}

func (c *countingWriter) count() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}
