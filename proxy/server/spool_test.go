package server

import (
	"bytes"
	crand "crypto/rand"
	"io"
	"os"
	"path/filepath"
	"testing"
	"testing/iotest"

	"github.com/opencontainers/go-digest"
)

func spoolBytes(t *testing.T, n int) []byte {
	b := make([]byte, n)
	if _, err := crand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// forward reads body through the spool's tee as a transport would (small, uneven reads),
// and returns what it read.
func forward(t *testing.T, sp *spool, body []byte, offset int64) []byte {
	t.Helper()
	got, err := io.ReadAll(iotest.HalfReader(sp.tee(bytes.NewReader(body), offset)))
	if err != nil {
		t.Fatal(err)
	}
	if err := sp.pause(); err != nil {
		t.Fatal(err)
	}
	return got
}

// answeredEarly tees body as a request the origin answers after reading only its first
// 4 KiB: the request ends (pause) with the rest unread, and reading the reader returned
// reads the rest as a transport still sending the body would (straggle).
func answeredEarly(t *testing.T, sp *spool, body []byte, offset int64) io.Reader {
	t.Helper()
	r := sp.tee(bytes.NewReader(body), offset)
	if _, err := io.ReadFull(r, make([]byte, 4096)); err != nil {
		t.Fatal(err)
	}
	if err := sp.pause(); err != nil {
		t.Fatal(err)
	}
	return r
}

// straggle reads the rest of a body answeredEarly left unread.
func straggle(t *testing.T, r io.Reader) {
	t.Helper()
	if _, err := io.ReadAll(r); err != nil {
		t.Fatal(err)
	}
}

// Chunks of sizes around the writer's chunk size, over several requests, make one file
// holding exactly the bytes forwarded; verifySpooled accepts them under their digest and
// size only.
func TestPushSpoolKeepsWhatWasForwarded(t *testing.T) {
	dir := t.TempDir()
	blob := spoolBytes(t, 3*spoolBuffer+12345)
	parts := [][]byte{blob[:1], blob[1 : spoolBuffer+1], blob[spoolBuffer+1 : 3*spoolBuffer], blob[3*spoolBuffer:]}

	sp := newSpool(filepath.Join(dir, "ok"))
	for _, p := range parts {
		if got := forward(t, sp, p, sp.end()); !bytes.Equal(got, p) {
			t.Fatal("the tee changed the bytes forwarded")
		}
	}
	path, size, ok := sp.finish(digest.FromBytes(blob))
	if !ok || size != int64(len(blob)) {
		t.Fatalf("finish: ok %v size %d", ok, size)
	}
	if b, err := os.ReadFile(path); err != nil || !bytes.Equal(b, blob) {
		t.Fatalf("the spool file does not hold the blob: %v", err)
	}
	if err := verifySpooled(path, size, digest.FromBytes(blob)); err != nil {
		t.Fatalf("the spool of the blob does not verify: %v", err)
	}
	if err := verifySpooled(path, size, digest.FromString("something else")); err == nil {
		t.Fatal("a spool verified under a digest its bytes do not have")
	}
	if err := verifySpooled(path, size-1, digest.FromBytes(blob)); err == nil {
		t.Fatal("a spool verified under a size it does not have")
	}
	sp.discard()
	if _, err := os.Stat(path); err != nil {
		t.Fatal("discard after finish removed the file handed over")
	}

}

// A chunk that does not continue where the spool ends, and bytes a transport reads after
// the request's end (they were forwarded, not kept), drop the spool; forwarding goes on.
func TestPushSpoolDropsWhatItCannotFollow(t *testing.T) {
	dir := t.TempDir()
	blob := spoolBytes(t, 100000)

	gap := newSpool(filepath.Join(dir, "gap"))
	forward(t, gap, blob[:1000], 0)
	if got := forward(t, gap, blob[2000:], 2000); !bytes.Equal(got, blob[2000:]) {
		t.Fatal("a dropped spool changed what is forwarded")
	}
	if _, _, ok := gap.finish(digest.FromBytes(blob)); ok {
		t.Fatal("a spool with a gap was kept")
	}

	late := newSpool(filepath.Join(dir, "late"))
	straggle(t, answeredEarly(t, late, blob, 0))
	if _, _, ok := late.finish(digest.FromBytes(blob)); ok {
		t.Fatal("a spool read after its request ended was kept")
	}

	// The same straggler on a chunk the origin took (202): the next chunk finds it.
	took := newSpool(filepath.Join(dir, "took"))
	straggle(t, answeredEarly(t, took, blob[:50000], 0))
	took.agree(50000)
	forward(t, took, blob[50000:], 50000)
	if _, _, ok := took.finish(digest.FromBytes(blob)); ok {
		t.Fatal("a spool missing bytes read after their request ended was kept")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("%d spool files left", len(ents))
	}
}

// The empty blob is a spool of no bytes.
func TestPushSpoolEmptyBlob(t *testing.T) {
	sp := newSpool(filepath.Join(t.TempDir(), "empty"))
	path, size, ok := sp.finish(digest.FromBytes(nil))
	if !ok || size != 0 {
		t.Fatalf("empty blob: ok %v size %d", ok, size)
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() != 0 {
		t.Fatalf("empty blob file: %v", err)
	}
}

// A chunk the origin refused is forgotten (rewind): one at the spool's end, one that
// starts elsewhere, and bytes a transport reads from a refused body after its answer;
// the upload's own chunks around them make the blob.
func TestPushSpoolRewindsRefusedChunk(t *testing.T) {
	dir := t.TempDir()
	blob := spoolBytes(t, 2*spoolBuffer+999)
	junk := spoolBytes(t, spoolBuffer+1)
	sp := newSpool(filepath.Join(dir, "rewind"))
	forward(t, sp, blob[:1000], 0)

	mark := sp.end()
	r := answeredEarly(t, sp, junk, mark) // at the end, refused
	sp.rewind(mark)
	straggle(t, r) // the straggler of the refused body
	// Refused again, and read on after the answer but before the handler rewinds: an
	// origin that refuses without reading the body answers while the transport still
	// sends it (make test lost a pushed blob's spool so).
	straggle(t, answeredEarly(t, sp, junk, mark)) // the straggler, before the verdict
	sp.rewind(mark)
	forward(t, sp, junk, 0) // elsewhere, refused
	sp.rewind(mark)
	if sp.end() != 1000 {
		t.Fatalf("spool end %d after the refused chunks, want 1000", sp.end())
	}
	forward(t, sp, blob[1000:], sp.end())
	path, size, ok := sp.finish(digest.FromBytes(blob))
	if !ok || size != int64(len(blob)) {
		t.Fatalf("finish: ok %v size %d", ok, size)
	}
	if b, err := os.ReadFile(path); err != nil || !bytes.Equal(b, blob) {
		t.Fatalf("the spool file does not hold the blob: %v", err)
	}

	// A chunk elsewhere that the origin took (no rewind): the spool cannot follow.
	stray := newSpool(filepath.Join(dir, "stray"))
	forward(t, stray, blob[:1000], 0)
	forward(t, stray, blob[2000:], 2000)
	stray.agree(int64(len(blob)))
	if _, _, ok := stray.finish(digest.FromBytes(blob)); ok {
		t.Fatal("a spool that missed a chunk the origin took was kept")
	}
}
