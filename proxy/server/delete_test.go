package server_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/internal/peers"
	"github.com/cove-oci/cove/proxy/server"
)

var acceptHeader = map[string]string{"Accept": acceptManifests}

// originGETs counts the origin's GETs whose path contains part since request n.
func originGETs(o *peers.Registry, since int, part string) int {
	n := 0
	for _, q := range o.Requests()[since:] {
		if q.Method == http.MethodGet && strings.Contains(q.Path, part) {
			n++
		}
	}
	return n
}

// errorCode is the first distribution error code of an error body ("" without one).
func errorCode(body []byte) string {
	var doc struct {
		Errors []struct{ Code string } `json:"errors"`
	}
	if json.Unmarshal(body, &doc) != nil || len(doc.Errors) == 0 {
		return ""
	}
	return doc.Errors[0].Code
}

// tagRecorded reports whether the cache holds a record of repo's tag at registry.
func tagRecorded(t *testing.T, c *cache, registry, repo, tag string) bool {
	t.Helper()
	_, err := c.store.GetRecord(t.Context(), "tag/"+registry+"/"+repo+"/@"+tag)
	if err != nil && !errdefs.IsNotFound(err) {
		t.Fatal(err)
	}
	return err == nil
}

// DELETE of a blob, of a manifest by digest and of a tag, through the cache (ns=) to an
// origin with deletion enabled: each is the origin's 202, relayed, and the origin no
// longer holds the object in that repository. The cache stops serving it there (without
// the drop, a fresh allowance and the membership would serve it from the cache), and
// keeps serving the same digests in another repository from its store, asking the
// origin for no blob or manifest.
func TestDeleteWritesThrough(t *testing.T) {
	origin := peers.StartRegistry(t)
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 2, 64<<10)
	if out, err := peers.Crane(t, origin.Addr, "", "", "copy", img.Ref, origin.Addr+"/team/copy:v1"); err != nil {
		t.Fatalf("crane copy: %v: %s", err, out)
	}
	if out, err := peers.Crane(t, origin.Addr, "", "", "tag", origin.Addr+"/team/copy:v1", "v2"); err != nil {
		t.Fatalf("crane tag: %v: %s", err, out)
	}
	c := newCache(t, origin.Addr)
	pullThrough(t, c, origin.Addr, "team/app", "v1", img, acceptHeader)
	pullThrough(t, c, origin.Addr, "team/copy", "v1", img, acceptHeader)
	pullThrough(t, c, origin.Addr, "team/copy", "v2", img, acceptHeader)
	if !tagRecorded(t, c, origin.Addr, "team/app", "v1") || !tagRecorded(t, c, origin.Addr, "team/copy", "v2") {
		t.Fatal("the pulls left no tag records")
	}
	layer := img.Layers[0]

	// A blob.
	resp, body := send(t, http.MethodDelete, c.url(origin.Addr, "/v2/team/app/blobs/"+layer), nil, nil)
	expect(t, "DELETE blob", resp, body, http.StatusAccepted)
	mustGet(t, origin.URL+"/v2/team/app/blobs/"+layer, nil, http.StatusNotFound)
	resp, body, err := do(t, http.MethodGet, c.url(origin.Addr, "/v2/team/app/blobs/"+layer), nil)
	if err != nil || resp.StatusCode != http.StatusNotFound || sha(body) == layer {
		t.Fatalf("the deleted blob through the cache: %v %d (its bytes: %v)", err, resp.StatusCode, sha(body) == layer)
	}

	// A manifest by digest: the tags naming it go too.
	resp, body = send(t, http.MethodDelete, c.url(origin.Addr, "/v2/team/app/manifests/"+img.Digest), nil, nil)
	expect(t, "DELETE manifest", resp, body, http.StatusAccepted)
	mustGet(t, origin.URL+"/v2/team/app/manifests/"+img.Digest, acceptHeader, http.StatusNotFound)
	resp, body, err = do(t, http.MethodGet, c.url(origin.Addr, "/v2/team/app/manifests/"+img.Digest), acceptHeader)
	if err != nil || resp.StatusCode != http.StatusNotFound || sha(body) == img.Digest {
		t.Fatalf("the deleted manifest through the cache: %v %d", err, resp.StatusCode)
	}
	if tagRecorded(t, c, origin.Addr, "team/app", "v1") {
		t.Fatal("the deleted manifest's tag is still recorded")
	}

	// A tag: the manifest stays, the tag's record goes.
	resp, body = send(t, http.MethodDelete, c.url(origin.Addr, "/v2/team/copy/manifests/v2"), nil, nil)
	expect(t, "DELETE tag", resp, body, http.StatusAccepted)
	mustGet(t, origin.URL+"/v2/team/copy/manifests/v2", acceptHeader, http.StatusNotFound)
	mustGet(t, c.url(origin.Addr, "/v2/team/copy/manifests/v2"), acceptHeader, http.StatusNotFound)
	if tagRecorded(t, c, origin.Addr, "team/copy", "v2") || !tagRecorded(t, c, origin.Addr, "team/copy", "v1") {
		t.Fatal("after deleting team/copy:v2: want its record gone, v1's kept")
	}

	// The same digests in team/copy: served from the store, the bytes kept.
	for _, d := range append([]string{img.Digest, img.Config}, img.Layers...) {
		if _, err := c.store.Stat(t.Context(), digest.Digest(d)); err != nil {
			t.Fatalf("%s left the store: %v", d, err)
		}
	}
	before := len(origin.Requests())
	if _, body := mustGet(t, c.url(origin.Addr, "/v2/team/copy/manifests/"+img.Digest), acceptHeader, 200); sha(body) != img.Digest {
		t.Fatal("team/copy's manifest: wrong bytes")
	}
	for _, d := range append([]string{img.Config}, img.Layers...) {
		if _, body := mustGet(t, c.url(origin.Addr, "/v2/team/copy/blobs/"+d), nil, 200); sha(body) != d {
			t.Fatalf("team/copy's %s: wrong bytes", d)
		}
	}
	if n := originGETs(origin, before, "/blobs/") + originGETs(origin, before, "/manifests/"); n != 0 {
		t.Fatalf("team/copy after deletes in team/app cost %d origin GETs", n)
	}

	// What the origin does not hold: its 404 and error, relayed.
	absent := digest.FromString("never pushed").String()
	direct, dbody := send(t, http.MethodDelete, origin.URL+"/v2/team/copy/blobs/"+absent, nil, nil)
	resp, body = send(t, http.MethodDelete, c.url(origin.Addr, "/v2/team/copy/blobs/"+absent), nil, nil)
	if resp.StatusCode != direct.StatusCode || errorCode(body) != errorCode(dbody) || errorCode(body) == "" {
		t.Fatalf("DELETE of an absent blob: the origin %d %s, through the cache %d %s", direct.StatusCode, dbody, resp.StatusCode, body)
	}
}

// An origin with deletion disabled (distribution's default) answers 405 UNSUPPORTED:
// relayed as it is, and the cache goes on serving what it holds.
func TestDeleteDisabledAtOrigin(t *testing.T) {
	origin := peers.StartRegistry(t, peers.WithDeleteDisabled())
	img := peers.PushRandomImage(t, origin.Addr, "team/app:v1", 1, 64<<10)
	c := newCache(t, origin.Addr)
	pullThrough(t, c, origin.Addr, "team/app", "v1", img, acceptHeader)
	for _, p := range []string{"/v2/team/app/blobs/" + img.Layers[0], "/v2/team/app/manifests/" + img.Digest} {
		direct, dbody := send(t, http.MethodDelete, origin.URL+p, nil, nil)
		resp, body := send(t, http.MethodDelete, c.url(origin.Addr, p), nil, nil)
		if direct.StatusCode != http.StatusMethodNotAllowed || resp.StatusCode != direct.StatusCode || errorCode(body) != errorCode(dbody) {
			t.Fatalf("DELETE %s: the origin %d %s, through the cache %d %s", p, direct.StatusCode, dbody, resp.StatusCode, body)
		}
	}
	before := len(origin.Requests())
	mustGet(t, c.url(origin.Addr, "/v2/team/app/manifests/"+img.Digest), acceptHeader, 200)
	if _, body := mustGet(t, c.url(origin.Addr, "/v2/team/app/blobs/"+img.Layers[0]), nil, 200); sha(body) != img.Layers[0] {
		t.Fatal("wrong bytes")
	}
	if n := originGETs(origin, before, "/v2/team/"); n != 0 {
		t.Fatalf("after refused deletes the cache fetched %d objects again", n)
	}
}

// Attack: tenant B deletes tenant A's manifest and layer through the cache with B's own
// token; A deletes with a token lacking delete. The origin refuses (401), the refusal is
// relayed, and nothing changes in the cache: A still pulls from it, with no origin blob
// GET, and is not handed the delete's challenge. Then the origin's admin deletes through
// the cache, by the default registry and the cache's token broker (crane delete): 202,
// and A's next read asks the origin and gets its 404.
func TestAttackDeleteOtherTenant(t *testing.T) {
	o := peers.StartTokenOrigin(t, tenantPasswords)
	img := o.Push(t, "team-a/app:v1", 2, 64<<10)
	c := newAliasedCache(t, "registry.test", o.Addr, func(cfg *server.Config) {
		cfg.DefaultRegistry = "registry.test"
		cfg.AuthzTTL = 5 * time.Minute // A's allowance outlives the test: its reads need no origin check
	})
	a := tokenHeader(t, o, "team-a", "repository:team-a/app:pull")
	pullThrough(t, c, "registry.test", "team-a/app", "v1", img, a)

	for _, tc := range []struct {
		who string
		hdr map[string]string
	}{
		{"team-b", tokenHeader(t, o, "team-b", "repository:team-a/app:delete")},
		{"team-a without delete", tokenHeader(t, o, "team-a", "repository:team-a/app:pull,push,delete")},
		{"anonymous", nil},
	} {
		for _, p := range []string{"/v2/team-a/app/manifests/" + img.Digest, "/v2/team-a/app/blobs/" + img.Layers[0], "/v2/team-a/app/manifests/v1"} {
			direct, _ := send(t, http.MethodDelete, o.URL+p, nil, tc.hdr)
			resp, body := send(t, http.MethodDelete, c.url("registry.test", p), nil, tc.hdr)
			if direct.StatusCode != http.StatusUnauthorized || resp.StatusCode != direct.StatusCode {
				t.Fatalf("%s: DELETE %s: the origin %d, through the cache %d %s", tc.who, p, direct.StatusCode, resp.StatusCode, body)
			}
			if ch := resp.Header.Get("Www-Authenticate"); !strings.Contains(ch, o.Tokens.Realm) {
				t.Fatalf("%s: DELETE %s: the origin's challenge not relayed: %q", tc.who, p, ch)
			}
		}
	}
	// Nothing changed: memberships and the tag's record are there, and A's reads of them
	// are served from the cache without asking the origin.
	for _, d := range []string{img.Digest, img.Layers[0]} {
		if _, err := c.store.GetRecord(t.Context(), "membership/registry.test/team-a/app/@"+d); err != nil {
			t.Fatalf("after refused deletes, the membership of %s: %v", d, err)
		}
	}
	if !tagRecorded(t, c, "registry.test", "team-a/app", "v1") {
		t.Fatal("after refused deletes, the tag's record is gone")
	}
	before := len(o.Requests())
	mustGet(t, c.url("registry.test", "/v2/team-a/app/manifests/"+img.Digest), a, 200)
	for _, d := range append([]string{img.Config}, img.Layers...) {
		if _, body := mustGet(t, c.url("registry.test", "/v2/team-a/app/blobs/"+d), a, 200); sha(body) != d {
			t.Fatalf("%s: wrong bytes", d)
		}
	}
	if reqs := o.Requests()[before:]; len(reqs) != 0 {
		t.Fatalf("after refused deletes, A's reads cost %d origin requests: %v", len(reqs), reqs)
	}

	// Without ns=, the cache's own challenge asks for delete.
	host := strings.TrimPrefix(c.http.URL, "http://")
	resp, body := send(t, http.MethodDelete, c.http.URL+"/v2/team-a/app/manifests/"+img.Digest, nil, nil)
	expect(t, "anonymous DELETE by the default registry", resp, body, http.StatusUnauthorized)
	if ch := resp.Header.Get("Www-Authenticate"); !strings.Contains(ch, c.http.URL+"/token") || !strings.Contains(ch, `scope="repository:team-a/app:delete"`) {
		t.Fatalf("challenge to a delete: %s", ch)
	}
	if out, err := peers.Crane(t, host, peers.TokenAdmin, o.Passwords[peers.TokenAdmin], "delete", host+"/team-a/app@"+img.Digest); err != nil {
		t.Fatalf("crane delete through the cache: %v: %s", err, out)
	}
	mustGet(t, o.URL+"/v2/team-a/app/manifests/"+img.Digest, tokenHeader(t, o, peers.TokenAdmin, "repository:team-a/app:pull"), http.StatusNotFound)
	resp, body, err := do(t, http.MethodGet, c.url("registry.test", "/v2/team-a/app/manifests/"+img.Digest), a)
	if err != nil || resp.StatusCode != http.StatusNotFound || sha(body) == img.Digest {
		t.Fatalf("A's manifest after the admin's delete: %v %d", err, resp.StatusCode)
	}
}
