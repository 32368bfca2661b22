package server_test

// Attack tests, hole 1: membership planted through a manifest's references. A manifest
// listing a digest is no proof that its repository holds that digest (distribution v3
// accepts a subject it does not have, and unchecked non-distributable layers): whatever
// tenant B makes its own manifests list, cove-cache must answer B's request in B's
// repository as the origin does (404), never with tenant A's cached bytes.

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/cove-oci/cove/internal/peers"
)

var tenantPasswords = map[string]string{"team-a": "team-a-secret-1x", "team-b": "team-b-secret-2x"}

// tokenHeader returns the headers of a client holding a token of o's token service for
// scope (repository:NAME:pull), fetched as user ("" for anonymous).
func tokenHeader(t *testing.T, o *peers.TokenOrigin, user, scope string) map[string]string {
	t.Helper()
	tok, err := peers.FetchToken(`Bearer realm="`+o.Tokens.Realm+`",service="`+o.Tokens.Service+`",scope="`+scope+`"`, user, o.Passwords[user])
	if err != nil {
		t.Fatalf("token for %q, %s: %v", user, scope, err)
	}
	return map[string]string{"Authorization": "Bearer " + tok, "Accept": acceptManifests}
}

// rawManifest is a manifest pushed byte for byte (go-containerregistry's remote.Put).
type rawManifest struct {
	body      []byte
	mediaType types.MediaType
}

func (m rawManifest) RawManifest() ([]byte, error)        { return m.body, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return m.mediaType, nil }

// putManifest pushes body to registryAddr/repoAndTag (plain HTTP) as user ("" for
// anonymous), straight to the origin, and returns its digest.
func putManifest(t *testing.T, registryAddr, repoAndTag string, mediaType types.MediaType, body []byte, user, password string) string {
	t.Helper()
	ref, err := name.ParseReference(registryAddr+"/"+repoAndTag, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Put(ref, rawManifest{body, mediaType}, remote.WithAuth(basicOrAnonymous(user, password))); err != nil {
		t.Fatalf("push manifest %s: %v", repoAndTag, err)
	}
	return sha(body)
}

func basicOrAnonymous(user, password string) authn.Authenticator {
	if user == "" {
		return authn.Anonymous
	}
	return &authn.Basic{Username: user, Password: password}
}

// plantingManifest is the OCI image manifest of img (already in the repository) with the
// changes edit makes to its JSON object.
func plantingManifest(t *testing.T, registryAddr string, img peers.Image, user, password string, edit func(m map[string]any)) []byte {
	t.Helper()
	ref, err := name.ParseReference(img.Ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := remote.Get(ref, remote.WithAuth(basicOrAnonymous(user, password)))
	if err != nil {
		t.Fatalf("get %s: %v", img.Ref, err)
	}
	var m map[string]any
	if err := json.Unmarshal(desc.Manifest, &m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// pullThrough pulls repo:tag (manifest, config, layers) through c with hdr.
func pullThrough(t *testing.T, c *cache, originAddr, repo, tag string, img peers.Image, hdr map[string]string) {
	t.Helper()
	mustGet(t, c.url(originAddr, "/v2/"+repo+"/manifests/"+tag), hdr, 200)
	for _, d := range append([]string{img.Config}, img.Layers...) {
		if _, body := mustGet(t, c.url(originAddr, "/v2/"+repo+"/blobs/"+d), hdr, 200); sha(body) != d {
			t.Fatalf("%s through the cache: wrong bytes", d)
		}
	}
	c.settle(t)
}

// sameAsOrigin asks the origin directly and through c for path with hdr: c must give the
// origin's status, and never the victim's bytes (secret, a digest).
func sameAsOrigin(t *testing.T, c *cache, originAddr, path string, hdr map[string]string, secret string) {
	t.Helper()
	direct, _, err := do(t, http.MethodGet, "http://"+originAddr+path, hdr)
	if err != nil {
		t.Fatal(err)
	}
	via, body, err := do(t, http.MethodGet, c.url(originAddr, path), hdr)
	if err != nil {
		t.Fatal(err)
	}
	if sha(body) == secret || via.StatusCode != direct.StatusCode {
		t.Errorf("GET %s: the origin answers %d, cove-cache answered %d with %d bytes (the victim's %s: %v)",
			path, direct.StatusCode, via.StatusCode, len(body), secret, sha(body) == secret)
	}
}

// servedBlob counts the origin's 200 answers to GETs of blob d.
func servedBlob(r *peers.Registry, d string) int {
	n := 0
	for _, q := range r.Requests() {
		if q.Method == http.MethodGet && q.Status == 200 && strings.HasSuffix(q.Path, "/blobs/"+d) {
			n++
		}
	}
	return n
}

const nonDistributableLayer = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"

// Tenant B makes a manifest of its own list tenant A's cached private digests, fetches it
// through the cache, and asks for those digests in its own repository.
func TestAttackPlantedMembership(t *testing.T) {
	o := peers.StartTokenOrigin(t, tenantPasswords, peers.WithManifestURLs(`^https://`))
	admin := o.Passwords[peers.TokenAdmin]
	imgA := o.Push(t, "team-a/app:v1", 1, 64<<10)
	imgB := o.Push(t, "team-b/app:v1", 1, 4096)
	imgP := o.Push(t, "public/app:v1", 1, 4096)
	var logs syncBuffer
	c := newCacheWith(t, debugLogs(&logs), o.Addr)
	defer func() { assertNoSecrets(t, c, &logs, o.Tokens.Tokens(), o.Passwords) }()
	pullThrough(t, c, o.Addr, "team-a/app", "v1", imgA, tokenHeader(t, o, "team-a", "repository:team-a/app:pull"))

	layer := map[string]any{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": imgA.Layers[0], "size": 1}
	subjectManifest := map[string]any{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": imgA.Digest, "size": 1}
	for _, tc := range []struct {
		name     string
		base     peers.Image // the attacker's own image, in repo
		repo     string
		user     string // the attacker
		edit     func(m map[string]any)
		askPath  string // what the attacker then asks for in repo
		victimOf string // digest whose bytes must not come back
	}{
		{"subject names A's layer", imgB, "team-b/app", "team-b",
			func(m map[string]any) { m["subject"] = layer }, "/blobs/" + imgA.Layers[0], imgA.Layers[0]},
		{"subject names A's manifest", imgB, "team-b/app", "team-b",
			func(m map[string]any) { m["subject"] = subjectManifest }, "/manifests/" + imgA.Digest, imgA.Digest},
		{"anonymous, public repository, subject names A's layer", imgP, "public/app", "",
			func(m map[string]any) { m["subject"] = layer }, "/blobs/" + imgA.Layers[0], imgA.Layers[0]},
		{"non-distributable layer with urls is A's layer", imgB, "team-b/app", "team-b",
			func(m map[string]any) {
				m["layers"] = append(m["layers"].([]any), map[string]any{
					"mediaType": nonDistributableLayer, "digest": imgA.Layers[0], "size": 1, "urls": []string{"https://layers.example/a"}})
			}, "/blobs/" + imgA.Layers[0], imgA.Layers[0]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tag := "plant-" + sha([]byte(tc.name))[7:19]
			body := plantingManifest(t, o.Addr, tc.base, peers.TokenAdmin, admin, tc.edit)
			pusher := tc.user // B pushes into its own repository with its own rights
			if pusher == "" {
				pusher = peers.TokenAdmin // a public repository's maintainer; anonymous reads
			}
			putManifest(t, o.Addr, tc.repo+":"+tag, types.OCIManifestSchema1, body, pusher, o.Passwords[pusher])
			hdr := tokenHeader(t, o, tc.user, "repository:"+tc.repo+":pull")
			if _, got := mustGet(t, c.url(o.Addr, "/v2/"+tc.repo+"/manifests/"+tag), hdr, 200); string(got) != string(body) {
				t.Fatal("the planting manifest did not come back as pushed")
			}
			sameAsOrigin(t, c, o.Addr, "/v2/"+tc.repo+tc.askPath, hdr, tc.victimOf)
		})
	}
}

// Tenant B asking for A's digests in A's repository (the origin refuses B) erases nothing:
// A's next pull is still served, warm, from the cache.
func TestAttackCannotEraseMembership(t *testing.T) {
	o := peers.StartTokenOrigin(t, tenantPasswords)
	imgA := o.Push(t, "team-a/app:v1", 1, 64<<10)
	c := newCache(t, o.Addr)
	a := tokenHeader(t, o, "team-a", "repository:team-a/app:pull")
	pullThrough(t, c, o.Addr, "team-a/app", "v1", imgA, a)
	gets := servedBlob(o.Registry, imgA.Layers[0])

	for _, h := range []map[string]string{
		tokenHeader(t, o, "team-b", "repository:team-a/app:pull"), // a token granting nothing there
		tokenHeader(t, o, "team-b", "repository:team-b/app:pull"),
		tokenHeader(t, o, "", "repository:team-a/app:pull"),
		{"Authorization": "Bearer not-a-token", "Accept": acceptManifests},
		{"Accept": acceptManifests},
	} {
		for _, p := range []string{"/v2/team-a/app/blobs/" + imgA.Layers[0], "/v2/team-a/app/manifests/" + imgA.Digest, "/v2/team-a/app/manifests/v1"} {
			sameAsOrigin(t, c, o.Addr, p, h, "")
			if resp, _, err := do(t, http.MethodHead, c.url(o.Addr, p), h); err != nil || resp.StatusCode == 200 {
				t.Errorf("HEAD %s by another tenant: %v %v", p, resp.StatusCode, err)
			}
		}
	}
	// A, with the same token and with a new one: 200, A's bytes, from the cache.
	for _, h := range []map[string]string{a, tokenHeader(t, o, "team-a", "repository:team-a/app:pull")} {
		if _, body := mustGet(t, c.url(o.Addr, "/v2/team-a/app/blobs/"+imgA.Layers[0]), h, 200); sha(body) != imgA.Layers[0] {
			t.Fatal("A's layer: wrong bytes")
		}
		if _, body := mustGet(t, c.url(o.Addr, "/v2/team-a/app/manifests/"+imgA.Digest), h, 200); sha(body) != imgA.Digest {
			t.Fatal("A's manifest: wrong bytes")
		}
	}
	if n := servedBlob(o.Registry, imgA.Layers[0]); n != gets {
		t.Fatalf("A's layer was fetched from the origin again (%d GETs, was %d): its cache entry was lost", n, gets)
	}
}
