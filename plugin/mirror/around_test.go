package mirror_test

import (
	"bytes"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/plugin/mirror"
)

type arounds struct {
	mu  sync.Mutex
	got []string // registry|repository|reason
}

func (a *arounds) report(registry, repository, reason string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.got = append(a.got, registry+"|"+repository+"|"+reason)
}

func (a *arounds) list() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.got...)
}

// syncBuffer is a log sink safe for the mirror's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A pull that gets a 401 for its manifest and never succeeds through the mirror went
// round the cache (containerd goes to the origin on a 401): it is reported once per
// pull, with whether a credential was tried, and logged once per repository (rate
// limited), without the credential. A challenge answered with good credentials is not.
func TestPullAroundCacheDetected(t *testing.T) {
	origin := peers.StartRegistry(t, peers.WithHtpasswd("alice", "pw-alice-1x"))
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 1024, peers.WithPushAuth("alice", "pw-alice-1x"))
	cache := startCache(t, origin.Addr)
	const window = 300 * time.Millisecond
	rep := &arounds{}
	logs := &syncBuffer{}
	cfg := fastConfig(cache.URL)
	cfg.AroundCache, cfg.AroundCacheWindow = rep.report, window
	cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	m, _ := startMirror(t, cfg, origin.Addr)

	do := func(method, path, user, password string) int {
		t.Helper()
		req, _ := http.NewRequest(method, m.URL+path+"?ns="+url.QueryEscape(origin.Addr), nil)
		req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json")
		if user != "" {
			req.SetBasicAuth(user, password)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	manifest, blob := "/v2/team/app/manifests/v1", "/v2/team/app/blobs/"+img.Layers[0]
	settle := func(want int) []string {
		t.Helper()
		time.Sleep(window + 300*time.Millisecond)
		if got := rep.list(); len(got) != want {
			t.Fatalf("reported %v, want %d", got, want)
		}
		return rep.list()
	}

	// containerd with the credentials: challenged, then authorized.
	if do(http.MethodHead, manifest, "", "") != 401 || do(http.MethodHead, manifest, "alice", "pw-alice-1x") != 200 {
		t.Fatal("the challenge and the authorized retry did not come through")
	}
	do(http.MethodGet, blob, "alice", "pw-alice-1x")
	settle(0)

	// containerd without credentials for this host: the manifest and each blob get a
	// 401, and it fetches them from the origin.
	do(http.MethodHead, manifest, "", "")
	do(http.MethodGet, blob, "", "")
	got := settle(1)
	if want := origin.Addr + "|team/app|" + mirror.AroundNoCredentials; got[0] != want {
		t.Fatalf("reported %q, want %q", got[0], want)
	}

	// Credentials tried and refused: the same, another reason; logged only once.
	do(http.MethodHead, manifest, "", "")
	do(http.MethodHead, manifest, "alice", "wrong-password")
	if got := settle(2); got[1] != origin.Addr+"|team/app|"+mirror.AroundRefused {
		t.Fatalf("reported %q, want credentials-refused", got[1])
	}

	// A blob alone starts nothing: a pull starts with its manifest.
	do(http.MethodGet, blob, "", "")
	settle(2)

	text := logs.String()
	if n := strings.Count(text, "went round the cache"); n != 1 {
		t.Fatalf("%d log lines about pulls round the cache, want 1 (rate limited):\n%s", n, text)
	}
	if !strings.Contains(text, "repository=team/app") || strings.Contains(text, "pw-alice") || strings.Contains(text, "wrong-password") {
		t.Fatalf("log line without the repository, or with a credential:\n%s", text)
	}
}
