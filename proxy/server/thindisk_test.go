package server_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/server"
	"github.com/cove-oci/cove/proxy/storage/filesystem"
)

// A thinly provisioned disk that runs out under the store: every spool write succeeds
// (into the page cache) and the commit's fsync fails. The client that asked was already
// served the whole verified blob; nothing is stored (the fsync comes before the rename
// that makes a blob visible); the failure is counted as a commit error and /readyz names
// the degraded store. Once the pool grows, the next fill is stored, with no restart.
func TestThinDiskFailsAtCommit(t *testing.T) {
	disk := peers.MountThinExt4(t, 256<<20, 6<<20)
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 24<<20)
	layer := img.Layers[0]
	store, err := filesystem.New(disk.Dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() }) // its lock file, before the disk is unmounted
	c := newCacheWith(t, func(cfg *server.Config) {
		cfg.Storage = store
		cfg.SpoolDir = filepath.Join(disk.Dir, "spool")
	}, origin.Addr)
	c.store = store
	u := c.url(origin.Addr, "/v2/team/app/blobs/"+layer)

	_, body := mustGet(t, u, nil, 200)
	if digest.FromBytes(body).String() != layer {
		t.Fatal("the client got a wrong blob")
	}
	c.settle(t)
	if _, err := store.Stat(context.Background(), digest.Digest(layer)); err == nil {
		t.Fatal("a blob whose commit failed was stored")
	}
	m := c.srv.Metrics()
	if n := testutil.ToFloat64(m.StoreErrors.WithLabelValues("commit", "no_space")); n != 1 {
		t.Fatalf("commit store errors (no_space) = %v, want 1", n)
	}
	_, ready := mustGet(t, c.http.URL+"/readyz", nil, 200)
	if !strings.Contains(string(ready), "store degraded") || !strings.Contains(string(ready), "no_space") {
		t.Fatalf("readyz = %q", ready)
	}

	disk.Grow(t, 128<<20)
	_, body = mustGet(t, u, nil, 200)
	if digest.FromBytes(body).String() != layer {
		t.Fatal("the client got a wrong blob after the pool grew")
	}
	c.settle(t)
	if size, err := store.Stat(context.Background(), digest.Digest(layer)); err != nil || size != int64(len(body)) {
		t.Fatalf("after the pool grew the blob was not stored: %d, %v", size, err)
	}
	if testutil.ToFloat64(m.StoreDegraded) != 0 {
		t.Fatal("cove_store_degraded still 1 after a blob was stored")
	}
	if n := origin.BlobGETs()[layer]; n != 2 {
		t.Fatalf("origin GETs of the layer = %d, want 2", n)
	}
}
