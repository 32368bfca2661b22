package origin

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

func TestURL(t *testing.T) {
	c := New(WithPlainHTTP("127.0.0.1:5000"))
	for _, tt := range []struct{ registry, path, want string }{
		{"ghcr.io", "/v2/a/b/manifests/v1", "https://ghcr.io/v2/a/b/manifests/v1"},
		{"docker.io", "/v2/library/alpine/blobs/sha256:x", "https://registry-1.docker.io/v2/library/alpine/blobs/sha256:x"},
		{"127.0.0.1:5000", "/v2/team/app/tags/list", "http://127.0.0.1:5000/v2/team/app/tags/list"},
		{"127.0.0.1:5001", "/v2/", "https://127.0.0.1:5001/v2/"},
	} {
		if got := c.URL(tt.registry, tt.path, nil); got != tt.want {
			t.Errorf("URL(%s, %s) = %s, want %s", tt.registry, tt.path, got, tt.want)
		}
	}
	if got := c.URL("ghcr.io", "/v2/a/tags/list", url.Values{"n": {"10"}}); got != "https://ghcr.io/v2/a/tags/list?n=10" {
		t.Fatal(got)
	}
}

func TestDoForwardsOnlyWhatMatters(t *testing.T) {
	var got http.Header
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r.Header.Clone()
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	var observed []int
	c := New(WithPlainHTTP(host), WithObserver(func(_ string, status int, err error) { observed = append(observed, status) }))
	client := http.Header{}
	client.Set("Authorization", "Bearer t")
	client.Set("Accept-Encoding", "gzip")
	client.Set("Cookie", "c=1")
	resp, err := c.Do(t.Context(), http.MethodGet, host, "/v2/", nil, client, http.Header{"Range": {"bytes=5-"}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got.Get("Authorization") != "Bearer t" || got.Get("Accept-Encoding") != "identity" || got.Get("Cookie") != "" || got.Get("Range") != "bytes=5-" {
		t.Fatalf("origin saw %v", got)
	}
	if len(observed) != 1 || observed[0] != 200 {
		t.Fatalf("observer saw %v", observed)
	}
}
