package server_test

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
)

// at is a Location the cache answered, on replica c.
func at(t *testing.T, c *cache, loc string) string {
	t.Helper()
	u, err := url.Parse(loc)
	if err != nil || u.Host != "" {
		t.Fatalf("Location %q: want a path of the cache", loc)
	}
	return c.http.URL + loc
}

// A blob pushed in chunks through two replicas, every request at the replica the
// previous one did not go to: the replica without the session forwards each request to
// the one holding it; the push succeeds, the origin holds the bytes, and a pull through
// either replica is a hit.
func TestPeerUploadAcrossReplicas(t *testing.T) {
	reg := peers.StartRegistry(t, peers.WithHtpasswd("team-a", "pw-a"))
	rs := newReplicaSet(t, 2, reg.Addr, nil)
	auth := map[string]string{"Authorization": "Basic " + basic("team-a", "pw-a")}
	blob := randomBytes(t, 3<<20+77)
	d := digest.FromBytes(blob)
	parts := [][]byte{blob[:1<<20], blob[1<<20 : 2<<20], blob[2<<20:]}

	resp, body := send(t, http.MethodPost, rs.replicas[0].url(reg.Addr, "/v2/team-a/app/blobs/uploads/"), nil, auth)
	expect(t, "POST at replica 0", resp, body, http.StatusAccepted)
	loc := resp.Header.Get("Location")
	handle := loc[strings.LastIndex(loc, "/")+1 : strings.Index(loc, "?")]
	if !strings.HasPrefix(handle, cluster.MemberID(rs.urls[0])) {
		t.Fatalf("handle %q does not name replica 0 (%s)", handle, cluster.MemberID(rs.urls[0]))
	}
	off := 0
	for i, p := range parts[:2] {
		c := rs.replicas[(i+1)%2] // 1, then 0
		hdr := map[string]string{"Content-Type": "application/octet-stream", "Content-Range": strconv.Itoa(off) + "-" + strconv.Itoa(off+len(p)-1)}
		for k, v := range auth {
			hdr[k] = v
		}
		resp, body = send(t, http.MethodPatch, at(t, c, loc), p, hdr)
		expect(t, "PATCH "+strconv.Itoa(i), resp, body, http.StatusAccepted)
		off += len(p)
		if got, want := resp.Header.Get("Range"), "0-"+strconv.Itoa(off-1); got != want {
			t.Fatalf("PATCH %d: Range %q, want %q", i, got, want)
		}
		loc = resp.Header.Get("Location")
	}
	resp, body = send(t, http.MethodGet, at(t, rs.replicas[1], loc), nil, auth)
	expect(t, "status GET at replica 1", resp, body, http.StatusNoContent)
	hdr := map[string]string{"Content-Type": "application/octet-stream"}
	for k, v := range auth {
		hdr[k] = v
	}
	resp, body = send(t, http.MethodPut, withQuery(at(t, rs.replicas[1], loc), "digest", d.String()), parts[2], hdr)
	expect(t, "PUT at replica 1", resp, body, http.StatusCreated)
	if _, direct := mustGet(t, "http://"+reg.Addr+"/v2/team-a/app/blobs/"+d.String(), auth, 200); !bytes.Equal(direct, blob) {
		t.Fatal("the origin does not hold the pushed bytes")
	}
	gets := reg.BlobGETs()[d.String()]
	for _, c := range rs.replicas {
		c.settle(t)
	}
	for i, c := range rs.replicas {
		if _, got := mustGet(t, c.url(reg.Addr, "/v2/team-a/app/blobs/"+d.String()), auth, 200); !bytes.Equal(got, blob) {
			t.Fatalf("wrong bytes through replica %d", i)
		}
	}
	if n := reg.BlobGETs()[d.String()]; n != gets {
		t.Fatalf("pulls through the replicas fetched the pushed blob from the origin (%d GETs)", n-gets)
	}
	if n := rs.replicas[0].srv.UploadSessions() + rs.replicas[1].srv.UploadSessions(); n != 0 {
		t.Fatalf("%d upload sessions left open", n)
	}
}

// Attacks on a session held by replica 0, sent to replica 1: a request without
// credentials gets the origin's 401 (through the holder) and writes nothing; the handle
// under another repository, a forged handle naming replica 0, and a handle naming no
// member are 404 BLOB_UPLOAD_UNKNOWN.
func TestPeerUploadAttacks(t *testing.T) {
	reg := peers.StartRegistry(t, peers.WithHtpasswd("team-a", "pw-a"))
	rs := newReplicaSet(t, 2, reg.Addr, nil)
	auth := map[string]string{"Authorization": "Basic " + basic("team-a", "pw-a")}
	resp, body := send(t, http.MethodPost, rs.replicas[0].url(reg.Addr, "/v2/team-a/app/blobs/uploads/"), nil, auth)
	expect(t, "POST", resp, body, http.StatusAccepted)
	loc := resp.Header.Get("Location")
	handle := loc[strings.LastIndex(loc, "/")+1 : strings.Index(loc, "?")]
	chunk := randomBytes(t, 64<<10)
	patch := map[string]string{"Content-Type": "application/octet-stream", "Content-Range": "0-" + strconv.Itoa(len(chunk)-1)}

	resp, body = send(t, http.MethodPatch, at(t, rs.replicas[1], loc), chunk, patch)
	expect(t, "anonymous PATCH at the other replica", resp, body, http.StatusUnauthorized)
	resp, body = send(t, http.MethodGet, at(t, rs.replicas[0], loc), nil, auth)
	expect(t, "status GET at the holder", resp, body, http.StatusNoContent)
	if r := resp.Header.Get("Range"); r != "" && r != "0-0" {
		t.Fatalf("after the refused PATCH the origin holds %q of the upload", r)
	}

	var b [16]byte
	_, _ = rand.Read(b[:])
	random := base64.RawURLEncoding.EncodeToString(b[:])
	for _, c := range []struct{ what, path string }{
		{"the handle under another repository", "/v2/team-b/app/blobs/uploads/" + handle},
		{"a forged handle naming replica 0", "/v2/team-a/app/blobs/uploads/" + cluster.MemberID(rs.urls[0]) + random},
		{"a handle naming no member", "/v2/team-a/app/blobs/uploads/" + cluster.MemberID("http://127.0.0.1:1") + random},
	} {
		resp, body = send(t, http.MethodPatch, rs.replicas[1].url(reg.Addr, c.path), chunk, mergeHeaders(patch, auth))
		expect(t, c.what, resp, body, http.StatusNotFound)
		if !strings.Contains(string(body), "BLOB_UPLOAD_UNKNOWN") {
			t.Fatalf("%s: body %s, want BLOB_UPLOAD_UNKNOWN", c.what, body)
		}
	}
	// Nothing reached the origin's upload: it still holds no byte of it.
	resp, body = send(t, http.MethodGet, at(t, rs.replicas[1], loc), nil, auth)
	expect(t, "status GET through the other replica", resp, body, http.StatusNoContent)
	if r := resp.Header.Get("Range"); r != "" && r != "0-0" {
		t.Fatalf("after the attacks the origin holds %q of the upload", r)
	}
	for _, q := range reg.Requests() {
		if q.Method == http.MethodPatch && q.Status < 300 {
			t.Fatalf("the origin accepted a PATCH: %+v", q)
		}
	}
	// Nor did the holder's copy change: the owner completes the upload, and its blob is
	// kept (a pull through either replica costs the origin no GET).
	blob := randomBytes(t, 100<<10)
	d := digest.FromBytes(blob)
	resp, body = send(t, http.MethodPut, withQuery(at(t, rs.replicas[1], loc), "digest", d.String()), blob, mergeHeaders(auth, map[string]string{"Content-Type": "application/octet-stream"}))
	expect(t, "the owner's PUT", resp, body, http.StatusCreated)
	for _, c := range rs.replicas {
		c.settle(t)
	}
	gets := reg.BlobGETs()[d.String()]
	for i, c := range rs.replicas {
		if _, got := mustGet(t, c.url(reg.Addr, "/v2/team-a/app/blobs/"+d.String()), auth, 200); !bytes.Equal(got, blob) {
			t.Fatalf("wrong bytes through replica %d", i)
		}
	}
	if n := reg.BlobGETs()[d.String()]; n != gets {
		t.Fatalf("the upload the attacks were sent to was not kept: %d origin GETs", n-gets)
	}
}

func mergeHeaders(hs ...map[string]string) map[string]string {
	out := map[string]string{}
	for _, h := range hs {
		for k, v := range h {
			out[k] = v
		}
	}
	return out
}
