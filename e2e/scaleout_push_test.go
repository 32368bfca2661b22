package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/cluster"
)

// perRequestBalancer is an HTTP load balancer that sends each request to the next
// replica in turn, as an L7 balancer (an Ingress) does: the requests of one push,
// even on one connection, land on different replicas. Bodies stream through, and the
// client's Host is kept (cove-cache's token realm names it).
func perRequestBalancer(t *testing.T, replicas []string) string {
	t.Helper()
	var next atomic.Uint64
	rp := &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			u, _ := url.Parse(replicas[(next.Add(1)-1)%uint64(len(replicas))])
			r.SetURL(u)
			r.Out.Host = r.In.Host
		},
		FlushInterval: -1,
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// forwardedUploads counts, over every replica's log, upload requests forwarded to the
// replica holding their session.
func forwardedUploads(t *testing.T, cr *peers.CoveReplicas) int {
	t.Helper()
	n := 0
	for _, c := range cr.Replicas {
		for _, l := range c.Logs(t) {
			if l["msg"] == "upload request forwarded to the replica holding its session" {
				n++
			}
		}
	}
	return n
}

// Push through three cove-cache replicas on MinIO, each request of an upload at another
// replica than the one holding its session: crane through a per-request balancer, and a
// chunked upload driven by hand at replica 0, 1, 2 in turn. The pushes succeed, the
// origin holds the bytes, a fresh pull of each blob through any replica is a hit. Then
// the attacks, at a replica that does not hold the session: another tenant and an
// anonymous client sending a chunk with someone else's handle get the origin's refusal
// and write nothing; a forged handle naming a replica is that replica's 404.
func TestScaleOutPushAcrossReplicas(t *testing.T) {
	origin := peers.StartTokenOrigin(t, map[string]string{"team-a": "team-a-secret-1x", "team-b": "team-b-secret-2x"})
	src := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, src.Addr, "scratch/app:v1", 3, 2<<20)
	realmHost := strings.TrimPrefix(origin.Tokens.Realm, "http://")
	realmHost = realmHost[:strings.Index(realmHost, "/")]
	m := peers.StartMinIO(t)
	m.SetEnv(t)
	cr := peers.StartCoveReplicas(t, 3, "--origin-plain-http", origin.Addr, "--default-registry", origin.Addr,
		"--origin-allow", realmHost, "--s3-endpoint", m.Endpoint, "--s3-bucket", m.Bucket, "--log-level", "debug")
	urls := replicaURLs(cr)
	ns := "?ns=" + url.QueryEscape(origin.Addr)
	token := func(user, scope string) string {
		t.Helper()
		tok, err := peers.FetchToken(`Bearer realm="`+origin.Tokens.Realm+`",service="`+origin.Tokens.Service+`",scope="`+scope+`"`, user, origin.Passwords[user])
		if err != nil {
			t.Fatal(err)
		}
		return "Bearer " + tok
	}
	do := func(method, u, auth string, body []byte, hdr ...string) (*http.Response, []byte) {
		t.Helper()
		var rd io.Reader
		if body != nil {
			rd = bytes.NewReader(body)
		}
		req, _ := http.NewRequest(method, u, rd)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, u, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, b
	}
	want := func(what string, resp *http.Response, body []byte, status int) {
		t.Helper()
		if resp.StatusCode != status {
			t.Fatalf("%s: %d, want %d: %s", what, resp.StatusCode, status, body)
		}
	}
	originGETs := func() int {
		n := 0
		for _, c := range origin.BlobGETs() {
			n += c
		}
		return n
	}
	// pullHit GETs blob d through every replica as team-a and checks its bytes, with no
	// blob GET at the origin.
	pullHit := func(repo string, d digest.Digest) {
		t.Helper()
		before := originGETs()
		auth := token("team-a", "repository:"+repo+":pull")
		for i, u := range urls {
			resp, body := do(http.MethodGet, u+"/v2/"+repo+"/blobs/"+d.String()+ns, auth, nil)
			want(fmt.Sprintf("pull of %s through replica %d", d, i), resp, body, http.StatusOK)
			if digest.FromBytes(body) != d {
				t.Fatalf("replica %d served wrong bytes for %s", i, d)
			}
		}
		if n := originGETs() - before; n != 0 {
			t.Fatalf("pulling %s through the replicas cost %d blob GETs at the origin", d, n)
		}
	}

	// crane, through a balancer that sends each request to the next replica.
	host := perRequestBalancer(t, urls)
	out, err := peers.Crane(t, host, "team-a", origin.Passwords["team-a"], "copy", img.Ref, host+"/team-a/app:v1")
	if err != nil {
		t.Fatalf("crane copy through the replicas: %v\n%s\n%s", err, out, replicaLogs(cr))
	}
	if n := forwardedUploads(t, cr); n == 0 {
		t.Fatal("no upload request was forwarded: the requests did not cross replicas")
	} else {
		t.Logf("crane push: %d upload requests forwarded to the replica holding their session", n)
	}
	if got, _ := originGet(t, origin, "repository:team-a/app:pull", "/v2/team-a/app/manifests/v1"); got != img.Digest {
		t.Fatalf("the origin's manifest is %s, want %s", got, img.Digest)
	}
	for _, l := range allBlobs(img) {
		if got, _ := originGet(t, origin, "repository:team-a/app:pull", "/v2/team-a/app/blobs/"+l); got != l {
			t.Fatalf("the origin's blob %s has digest %s", l, got)
		}
	}
	for _, l := range allBlobs(img) {
		waitPushedStored(t, m, cr, digest.Digest(l))
		pullHit("team-a/app", digest.Digest(l))
	}

	// A chunked upload by hand: POST at replica 0, each later request at the next.
	authA := token("team-a", "repository:team-a/big:pull,push")
	blob := make([]byte, 24<<20+321)
	_, _ = rand.Read(blob)
	d := digest.FromBytes(blob)
	resp, body := do(http.MethodPost, urls[0]+"/v2/team-a/big/blobs/uploads/"+ns, authA, nil)
	want("POST at replica 0", resp, body, http.StatusAccepted)
	loc := resp.Header.Get("Location")
	if !strings.Contains(loc, "/uploads/"+cluster.MemberID(urls[0])) {
		t.Fatalf("Location %q does not name replica 0", loc)
	}
	chunk := 10 << 20
	off, i := 0, 1
	for ; off+chunk < len(blob); off, i = off+chunk, i+1 {
		resp, body = do(http.MethodPatch, urls[i%3]+loc, authA, blob[off:off+chunk],
			"Content-Type", "application/octet-stream", "Content-Range", strconv.Itoa(off)+"-"+strconv.Itoa(off+chunk-1))
		want(fmt.Sprintf("PATCH at replica %d", i%3), resp, body, http.StatusAccepted)
		loc = resp.Header.Get("Location")
	}

	// The attacks, at replica 1, which does not hold the session (replica 0 does).
	handle := loc[strings.LastIndex(loc, "/")+1 : strings.Index(loc, "?")]
	resp, body = do(http.MethodGet, urls[2]+loc, authA, nil)
	want("status GET at replica 2", resp, body, http.StatusNoContent)
	held := resp.Header.Get("Range")
	authB := token("team-b", "repository:team-a/big:pull,push")
	junk := make([]byte, 1<<20)
	_, _ = rand.Read(junk)
	for _, a := range []struct{ who, auth string }{{"team-b", authB}, {"anonymous", ""}} {
		resp, body = do(http.MethodPatch, urls[1]+loc, a.auth, junk,
			"Content-Type", "application/octet-stream", "Content-Range", strconv.Itoa(off)+"-"+strconv.Itoa(off+len(junk)-1))
		if resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusForbidden {
			t.Fatalf("%s's PATCH with team-a's handle at a replica without the session: %d, want the origin's refusal: %s", a.who, resp.StatusCode, body)
		}
		t.Logf("%s's PATCH with team-a's handle at a replica without the session: %d", a.who, resp.StatusCode)
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	for _, path := range []string{
		"/v2/team-a/big/blobs/uploads/" + cluster.MemberID(urls[0]) + base64.RawURLEncoding.EncodeToString(b[:]), // forged, naming replica 0
		"/v2/team-b/big/blobs/uploads/" + handle, // the real handle under another repository
	} {
		resp, body = do(http.MethodPatch, urls[1]+path+ns, authA, junk, "Content-Type", "application/octet-stream")
		want("PATCH "+path, resp, body, http.StatusNotFound)
		if !strings.Contains(string(body), "BLOB_UPLOAD_UNKNOWN") {
			t.Fatalf("PATCH %s: %s, want BLOB_UPLOAD_UNKNOWN", path, body)
		}
	}
	resp, body = do(http.MethodGet, urls[2]+loc, authA, nil)
	want("status GET at replica 2 after the attacks", resp, body, http.StatusNoContent)
	if got := resp.Header.Get("Range"); got != held {
		t.Fatalf("after the attacks the origin holds %q of the upload, want %q", got, held)
	}

	// The last chunk and the digest, at the next replica: the push is whole at the
	// origin, and kept (the attacks cost its holder nothing): pulls through any replica
	// are hits.
	resp, body = do(http.MethodPut, urls[i%3]+loc+"&digest="+url.QueryEscape(d.String()), authA, blob[off:], "Content-Type", "application/octet-stream")
	want(fmt.Sprintf("PUT at replica %d", i%3), resp, body, http.StatusCreated)
	if got, _ := originGet(t, origin, "repository:team-a/big:pull", "/v2/team-a/big/blobs/"+d.String()); got != d.String() {
		t.Fatalf("the origin's pushed blob has digest %s", got)
	}
	waitPushedStored(t, m, cr, d)
	pullHit("team-a/big", d)
	checkBucketBlobs(t, t.Context(), m)
}

// waitPushedStored waits until a pushed blob is in the shared store with its provenance
// record, the last thing stored (pushed blobs are stored in the background after the
// origin's 201); else it fails with the replicas' logs (why the spool was not kept).
func waitPushedStored(t *testing.T, m *peers.MinIO, cr *peers.CoveReplicas, d digest.Digest) {
	t.Helper()
	c, err := m.Client()
	if err != nil {
		t.Fatal(err)
	}
	prefix := "records/provenance/sha256/" + d.Encoded() + "/"
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for obj := range c.ListObjects(t.Context(), m.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
			if obj.Err == nil {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("the pushed blob %s was not stored with its provenance record\n%s", d, replicaLogs(cr))
}
