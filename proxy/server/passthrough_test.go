package server_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/fill"
	"github.com/cove-oci/cove/proxy/server"
)

// A store that refuses room passes blobs through. A client that stops reading is cut
// off once it has held the window for the lag (a broken transfer, never a clean end);
// its Range resume is served by a fresh fill and completes the blob. /readyz stays 200
// and names the condition.
func TestPassThroughCutOffClientResumes(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 16<<20)
	layer := img.Layers[0]
	refuse := func(context.Context, fill.Key, int64) (func(bool), error) {
		return nil, errors.New("store bound reached")
	}
	c := newCacheWith(t, func(cfg *server.Config) {
		cfg.Reserve = refuse
		cfg.PassThroughWindow = 256 << 10
	}, origin.Addr)
	u := c.url(origin.Addr, "/v2/team/app/blobs/"+layer)

	// A small receive buffer, so the kernel does not take the whole blob for the client.
	dialer := &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 32<<10)
		})
		return errors.Join(err, serr)
	}}
	client := &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}}
	stalled, err := client.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Body.Close()
	head := make([]byte, 100<<10)
	if _, err := io.ReadFull(stalled.Body, head); err != nil {
		t.Fatal(err)
	}
	// Its fill's window has moved past byte 0 by now: a new client gets a fill of its own.
	_, whole := mustGet(t, u, nil, http.StatusOK)
	if digest.FromBytes(whole).String() != layer {
		t.Fatal("the reading client got a wrong blob")
	}
	m := c.srv.Metrics()
	for deadline := time.Now().Add(10 * time.Second); testutil.ToFloat64(m.ReadersCut) == 0; {
		if time.Now().After(deadline) {
			t.Fatal("the stalled client was never cut off")
		}
		time.Sleep(20 * time.Millisecond)
	}
	rest, err := io.ReadAll(stalled.Body)
	got := append(head, rest...)
	if err == nil || len(got) >= len(whole) {
		t.Fatalf("the stalled client got %d of %d bytes and %v: want a broken transfer", len(got), len(whole), err)
	}
	if !bytes.Equal(got, whole[:len(got)]) {
		t.Fatal("the stalled client's bytes differ")
	}
	resp, tail := mustGet(t, u, map[string]string{"Range": "bytes=" + strconv.Itoa(len(got)) + "-"}, http.StatusPartialContent)
	if !bytes.Equal(append(got, tail...), whole) {
		t.Fatalf("resume from %d: %s, %d bytes do not complete the blob", len(got), resp.Header.Get("Content-Range"), len(tail))
	}
	c.settle(t)
	// Three fills (the stalled client's, the new client's, the resume's), or two when a
	// request found a fill whose window still held its first byte and joined it (under
	// load the stalled fill may not have moved past byte 0 yet, or still run at the
	// resume): both are right, as long as every fill passed through.
	gets := origin.BlobGETs()[layer]
	if gets != 2 && gets != 3 {
		t.Fatalf("origin GETs of the layer = %d, want 3 (the stalled client's fill, the new client's, the resume's) or 2 (one joined)", gets)
	}
	if cut := testutil.ToFloat64(m.ReadersCut); cut != 1 {
		t.Fatalf("readers cut = %v, want 1", cut)
	}
	if n := testutil.ToFloat64(m.PassedThrough.WithLabelValues(fill.ReasonReserveRefused)); n != float64(gets) {
		t.Fatalf("fills passed through = %v, want %d (one per origin GET)", n, gets)
	}
	if _, err := c.store.Stat(context.Background(), digest.Digest(layer)); err == nil {
		t.Fatal("a blob the store refused was stored")
	}
	_, body := mustGet(t, c.http.URL+"/readyz", nil, http.StatusOK)
	if !strings.Contains(string(body), "store degraded") || !strings.Contains(string(body), "reserve_refused") {
		t.Fatalf("readyz = %q", body)
	}
	if testutil.ToFloat64(m.StoreDegraded) != 1 {
		t.Fatal("cove_store_degraded is not 1")
	}
}

func TestPassthroughAndEndpoints(t *testing.T) {
	origin := peers.StartRegistry(t)
	peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 1024)
	peers.PushRandomImage(t, origin.Addr, "team/app:v2", 1, 1024)
	c := newCache(t, origin.Addr)
	_, body := mustGet(t, c.url(origin.Addr, "/v2/team/app/tags/list"), nil, 200)
	if !strings.Contains(string(body), `"v1"`) || !strings.Contains(string(body), `"v2"`) {
		t.Fatalf("tags list: %s", body)
	}
	_, body = mustGet(t, c.http.URL+"/v2/team/app/tags/list?n=1&ns="+url.QueryEscape(origin.Addr), nil, 200)
	if strings.Count(string(body), `"v`) != 1 {
		t.Fatalf("tags list with n=1: %s", body)
	}
	if resp, _ := mustGet(t, c.http.URL+"/v2/", nil, 401); !strings.HasPrefix(resp.Header.Get("Www-Authenticate"), `Bearer realm="`+c.http.URL+"/token\"") {
		t.Fatalf("ping without ns= challenged with %q, want cove-cache's own realm", resp.Header.Get("Www-Authenticate"))
	}
	mustGet(t, c.http.URL+"/healthz", nil, 200)
	mustGet(t, c.http.URL+"/readyz", nil, 200)
	_, metrics := mustGet(t, c.http.URL+"/metrics", nil, 200)
	for _, m := range []string{"cove_requests_total", "cove_origin_requests_total", "cove_fills_in_flight"} {
		if !strings.Contains(string(metrics), m) {
			t.Errorf("metrics lack %s", m)
		}
	}
}

// The last digest seen for a tag is remembered for the offline policy. (Referrers:
// referrers_test.go.)
func TestTagMemory(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 1024)
	c := newCache(t, origin.Addr)
	mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/v1"), map[string]string{"Accept": acceptManifests}, 200)
	rec, err := c.store.GetRecord(context.Background(), "tag/"+origin.Addr+"/team/app/@v1")
	if err != nil || !strings.Contains(string(rec), img.Digest) {
		t.Fatalf("tag record = %s, %v", rec, err)
	}
}
