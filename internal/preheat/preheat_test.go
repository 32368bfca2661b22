package preheat

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/internal/peers"
)

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// Run in process (under the race detector in make test) against a real cove-cache and
// origin, with the terminal bar drawing: two references sharing a repository fetch each
// blob once, and the bar ends full.
func TestRunThroughCove(t *testing.T) {
	origin := peers.StartRegistry(t)
	v1 := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 2, 512<<10)
	v2 := peers.PushRandomImage(t, origin.Addr, "team/app:v2", 1, 512<<10)
	cove := peers.StartCove(t, "", "--origin-plain-http", origin.Addr)

	var targets []Target
	for _, ref := range []string{v1.Ref, v2.Ref, v1.Ref} {
		tg, err := ParseTarget(ref)
		if err != nil {
			t.Fatal(err)
		}
		targets = append(targets, tg)
	}
	var out bytes.Buffer
	p := NewProgress(&out, true)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	res := Run(ctx, Options{Cache: mustURL(t, cove.URL), Progress: p}, targets)
	for i, img := range []peers.Image{v1, v2, v1} {
		if res[i].Err != nil || res[i].Resolved.String() != img.Digest || res[i].Blobs != len(img.Layers)+1 {
			t.Fatalf("result %d: %+v", i, res[i])
		}
	}
	want := v1.Size + v2.Size
	if p.Bytes() < want || p.Bytes() > want+16<<10 { // plus the two configs
		t.Fatalf("read %d bytes, want the layers' %d and the configs", p.Bytes(), want)
	}
	for d, n := range origin.BlobGETs() {
		if n != 1 {
			t.Fatalf("origin GETs of %s = %d, want 1", d, n)
		}
	}
	if !strings.Contains(out.String(), "] 100% ") || !strings.HasSuffix(out.String(), "blobs 5/5\n") {
		t.Fatalf("terminal output: %q", out.String())
	}
}

// lyingCache is a registry that answers with bytes other than those asked for: preheat
// must report every such object as failed, never as preheated.
func lyingCache(t *testing.T, tamper func(path string, body []byte) []byte) *httptest.Server {
	t.Helper()
	return fakeCache(t, func(w http.ResponseWriter, r *http.Request, body []byte) {
		w.Write(tamper(r.URL.Path, body))
	})
}

// fakeCache serves one image, registry.test/team/app:v1 (a config and a 4 KiB layer),
// each object's answer written by respond.
func fakeCache(t *testing.T, respond func(w http.ResponseWriter, r *http.Request, body []byte)) *httptest.Server {
	t.Helper()
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	layer := bytes.Repeat([]byte("cove"), 1024)
	man, _ := json.Marshal(ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    ocispec.Descriptor{MediaType: ocispec.MediaTypeImageConfig, Digest: digest.FromBytes(config), Size: int64(len(config))},
		Layers:    []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(layer), Size: int64(len(layer))}},
	})
	objects := map[string][]byte{
		"/v2/registry.test/team/app/manifests/v1":                               man,
		"/v2/registry.test/team/app/blobs/" + digest.FromBytes(config).String(): config,
		"/v2/registry.test/team/app/blobs/" + digest.FromBytes(layer).String():  layer,
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			return
		}
		body, ok := objects[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		if strings.Contains(r.URL.Path, "/manifests/") {
			w.Header().Set("Content-Type", ocispec.MediaTypeImageManifest)
			w.Header().Set("Docker-Content-Digest", digest.FromBytes(body).String())
		}
		respond(w, r, body)
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestRunRefusesWrongBytes(t *testing.T) {
	tg, err := ParseTarget("registry.test/team/app:v1")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name   string
		tamper func(path string, body []byte) []byte
		want   string
	}{
		{"honest", func(_ string, b []byte) []byte { return b }, ""},
		{"manifest not its digest", func(p string, b []byte) []byte {
			if strings.Contains(p, "/manifests/") {
				return append(b, ' ')
			}
			return b
		}, "body digest"},
		{"layer with other bytes", func(p string, b []byte) []byte {
			if strings.Contains(p, "/blobs/") && len(b) > 1000 {
				return bytes.Repeat([]byte("evil"), len(b)/4)
			}
			return b
		}, "digest mismatch"},
		{"layer cut short", func(p string, b []byte) []byte {
			if strings.Contains(p, "/blobs/") && len(b) > 1000 {
				return b[:len(b)-1]
			}
			return b
		}, "size mismatch"},
		{"layer too long", func(p string, b []byte) []byte {
			if strings.Contains(p, "/blobs/") && len(b) > 1000 {
				return append(b, 'x')
			}
			return b
		}, "size mismatch"},
	} {
		srv := lyingCache(t, tt.tamper)
		res := Run(t.Context(), Options{Cache: mustURL(t, srv.URL)}, []Target{tg})
		if tt.want == "" {
			if res[0].Err != nil || res[0].Blobs != 2 {
				t.Fatalf("%s: %+v", tt.name, res[0])
			}
			continue
		}
		if res[0].Err == nil || !strings.Contains(res[0].Err.Error(), tt.want) {
			t.Fatalf("%s: error %v, want one saying %q", tt.name, res[0].Err, tt.want)
		}
	}
}

// A blob whose body stalls, or that gets a 5xx, is tried again (cove-cache's fill goes
// on meanwhile); one the cache does not know (404) is not.
func TestRunRetriesBlobs(t *testing.T) {
	defer func(d time.Duration) { stallTimeout = d }(stallTimeout)
	stallTimeout = 300 * time.Millisecond
	tg, err := ParseTarget("registry.test/team/app:v1")
	if err != nil {
		t.Fatal(err)
	}
	isLayer := func(r *http.Request, body []byte) bool {
		return strings.Contains(r.URL.Path, "/blobs/") && len(body) > 1000
	}
	for _, tt := range []struct {
		name  string
		first func(w http.ResponseWriter, r *http.Request, body []byte)
		tries int32
		ok    bool
	}{
		{"stalled body", func(w http.ResponseWriter, r *http.Request, body []byte) {
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.Write(body[:len(body)/2])
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		}, 2, true},
		{"5xx", func(w http.ResponseWriter, r *http.Request, body []byte) {
			http.Error(w, `{"errors":[{"code":"UNAVAILABLE","message":"origin down"}]}`, http.StatusServiceUnavailable)
		}, 2, true},
		{"404", func(w http.ResponseWriter, r *http.Request, body []byte) {
			http.Error(w, `{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}`, http.StatusNotFound)
		}, 1, false},
	} {
		var tries atomic.Int32
		srv := fakeCache(t, func(w http.ResponseWriter, r *http.Request, body []byte) {
			if isLayer(r, body) {
				if tries.Add(1) == 1 || !tt.ok {
					tt.first(w, r, body)
					return
				}
			}
			w.Write(body)
		})
		res := Run(t.Context(), Options{Cache: mustURL(t, srv.URL)}, []Target{tg})
		if (res[0].Err == nil) != tt.ok || tries.Load() != tt.tries {
			t.Fatalf("%s: %d tries, error %v; want %d tries, ok=%v", tt.name, tries.Load(), res[0].Err, tt.tries, tt.ok)
		}
	}
}
