package fill

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
)

// A spool on a 1 MiB tmpfs fails mid-body with ENOSPC: readers reading the spooled bytes
// go on, later ones get the rest through the window, everyone gets the whole verified
// body, nothing is stored. With room again, the next fill is stored.
func TestSpoolWriteFailsMidBody(t *testing.T) {
	dir := peers.MountTmpfs(t, "size=1m")
	body := randomBytes(t, 3<<20+5)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, nil)
	var ev events
	c := &committed{blobs: map[digest.Digest][]byte{}}
	spool := filepath.Join(dir, "spool")
	m, err := NewManager(spool, c.commit, WithEvents(ev.hooks()), WithPassThroughWindow(512<<10))
	if err != nil {
		t.Fatal(err)
	}
	key := Key{Registry: "r", Digest: d}
	f, _ := m.Join(key, "o", get(origin.URL))
	ranges := [][2]int64{{0, -1}, {0, -1}, {100, 600 << 10}, {int64(len(body)) - 100, 100}}
	var wg sync.WaitGroup
	for i, rg := range ranges {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var got []byte
			var err error
			if i%2 == 0 {
				got, err = readAll(f, rg[0], rg[1])
			} else {
				got, err = io.ReadAll(f.NewReader(context.Background(), rg[0], rg[1]))
			}
			want := body[rg[0]:]
			if rg[1] >= 0 {
				want = want[:rg[1]]
			}
			if err != nil || !bytes.Equal(got, want) {
				t.Errorf("reader %d: %v, %d bytes, equal %v", i, err, len(got), bytes.Equal(got, want))
			}
		}()
	}
	wg.Wait()
	<-f.Settled()
	if !f.PassingThrough() {
		t.Fatal("a 3 MiB fill on a 1 MiB spool did not pass through")
	}
	f.Release()
	if _, ok := c.get(d); ok {
		t.Fatal("stored a blob whose spool failed")
	}
	assertSpoolEmpty(t, spool)
	storeErrs, passed, _, _ := ev.snapshot()
	if fmt.Sprint(storeErrs) != "[write/no_space]" || fmt.Sprint(passed) != "[no_space]" {
		t.Fatalf("store errors %v, passed through %v", storeErrs, passed)
	}
	if cond, degraded := m.StoreDegraded(); !degraded || cond.Op != "write" || cond.Reason != "no_space" {
		t.Fatalf("StoreDegraded = %+v, %v", cond, degraded)
	}

	// Space returns: no restart, the next fill stores the blob.
	peers.RemountTmpfs(t, dir, 0, "size=8m")
	f, _ = m.Join(key, "o", get(origin.URL))
	if got, err := readAll(f, 0, -1); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read after remount: %v", err)
	}
	<-f.Settled()
	f.Release()
	if b, ok := c.get(d); !ok || !bytes.Equal(b, body) {
		t.Fatal("not stored once space returned")
	}
	if _, degraded := m.StoreDegraded(); degraded {
		t.Fatal("still degraded after a blob was stored")
	}
	if n := calls.Load(); n != 2 {
		t.Fatalf("origin calls = %d, want 2", n)
	}
}

// A read-only store: the spool cannot even be created. The fill passes through from its
// first byte; a read-write remount ends the condition.
func TestSpoolCreateFailsReadOnly(t *testing.T) {
	dir := peers.MountTmpfs(t, "size=4m")
	body := randomBytes(t, 1<<20)
	d := digest.FromBytes(body)
	var calls atomic.Int32
	origin := slowOrigin(t, body, &calls, nil)
	var ev events
	c := &committed{blobs: map[digest.Digest][]byte{}}
	m, err := NewManager(filepath.Join(dir, "spool"), c.commit, WithEvents(ev.hooks()))
	if err != nil {
		t.Fatal(err)
	}
	peers.RemountTmpfs(t, dir, syscall.MS_RDONLY, "")
	key := Key{Registry: "r", Digest: d}
	f, _ := m.Join(key, "o", get(origin.URL))
	got, err := readAll(f, 0, -1)
	<-f.Settled()
	f.Release()
	if err != nil || !bytes.Equal(got, body) {
		t.Fatalf("read: %v, equal %v", err, bytes.Equal(got, body))
	}
	storeErrs, passed, _, _ := ev.snapshot()
	if fmt.Sprint(storeErrs) != "[create/read_only]" || fmt.Sprint(passed) != "[read_only]" {
		t.Fatalf("store errors %v, passed through %v", storeErrs, passed)
	}
	peers.RemountTmpfs(t, dir, 0, "")
	f, _ = m.Join(key, "o", get(origin.URL))
	if _, err := readAll(f, 0, -1); err != nil {
		t.Fatal(err)
	}
	<-f.Settled()
	f.Release()
	if _, ok := c.get(d); !ok {
		t.Fatal("not stored after the remount read-write")
	}
	if _, _, _, conditions := ev.snapshot(); fmt.Sprint(conditions) != "[true false]" {
		t.Fatalf("conditions %v, want [true false]", conditions)
	}
	if entries, _ := os.ReadDir(filepath.Join(dir, "spool")); len(entries) != 0 {
		t.Fatalf("spool holds %d files", len(entries))
	}
}
