package server_test

// Attack tests, referrers: a referrers list tells who signed what in a repository. Tenant
// B must not read tenant A's list through cove-cache when the origin refuses B, cold or
// cached; and what B plants in its own repository (a tag-schema index naming A's
// digests) teaches cove-cache nothing about A's repository.

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/internal/peers"
)

func TestAttackReferrers(t *testing.T) {
	o := peers.StartTokenOrigin(t, tenantPasswords)
	admin := o.Passwords[peers.TokenAdmin]
	imgA := o.Push(t, "team-a/app:v1", 1, 4096)
	imgB := o.Push(t, "team-b/app:v1", 1, 4096)
	// A signs its image with oras, through a cove-cache of its own (oras refuses a token
	// realm on loopback, so it goes through cove-cache's token broker).
	pusher := newAliasedCache(t, "registry.test", o.Addr, nil)
	sigA := attach(t, "registry.test/team-a", tenantPasswords["team-a"],
		strings.TrimPrefix(pusher.http.URL, "http://")+"/registry.test/team-a/app@"+imgA.Digest, sigType)
	var logs syncBuffer
	c := newCacheWith(t, debugLogs(&logs), o.Addr)
	defer func() { assertNoSecrets(t, c, &logs, o.Tokens.Tokens(), o.Passwords) }()
	a := tokenHeader(t, o, "team-a", "repository:team-a/app:pull")
	listA := "/v2/team-a/app/referrers/" + imgA.Digest
	tagA := "/v2/team-a/app/manifests/sha256-" + digest.Digest(imgA.Digest).Encoded()

	strangers := map[string]map[string]string{
		"B's token for A's repository": tokenHeader(t, o, "team-b", "repository:team-a/app:pull"),
		"B's token for its own":        tokenHeader(t, o, "team-b", "repository:team-b/app:pull"),
		"anonymous token":              tokenHeader(t, o, "", "repository:team-a/app:pull"),
		"no credentials":               {"Accept": acceptManifests},
		"forged token":                 {"Authorization": "Bearer not-a-token"},
	}
	refused := func(when string) {
		t.Helper()
		for who, h := range strangers {
			for _, q := range []string{"", "?artifactType=" + sigType} {
				u := c.url(o.Addr, listA)
				if q != "" {
					u = c.http.URL + listA + q + "&ns=" + o.Addr
				}
				resp, body, err := do(t, http.MethodGet, u, h)
				if err != nil {
					t.Fatal(err)
				}
				// The origin's own answer to this credential for the list (its tag).
				direct, _, err := do(t, http.MethodGet, "http://"+o.Addr+tagA, h)
				if err != nil {
					t.Fatal(err)
				}
				if resp.StatusCode == 200 || resp.StatusCode != direct.StatusCode || strings.Contains(string(body), sigA) {
					t.Errorf("%s, %s%s: cove-cache answered %d (the origin: %d): %s", when, who, q, resp.StatusCode, direct.StatusCode, body)
				}
			}
		}
	}
	refused("cold")

	// A reads its list and its signature through cove-cache: both are kept.
	idx, _ := referrersOf(t, c, o.Addr, "team-a/app", imgA.Digest, "", a)
	if got := referrerSet(idx); len(got) != 1 || got[sigA] != sigType {
		t.Fatalf("A's referrers = %v, want %s", got, sigA)
	}
	referrersOf(t, c, o.Addr, "team-a/app", imgA.Digest, sigType, a)
	mustGet(t, c.url(o.Addr, "/v2/team-a/app/manifests/"+sigA), a, 200)
	c.settle(t)
	refused("cached")

	// B plants, in its own repository: an artifact whose subject is A's image, and the
	// tag-schema index for A's digest listing it and A's signature.
	b := tokenHeader(t, o, "team-b", "repository:team-b/app:pull")
	planted := putManifest(t, o.Addr, "team-b/app:planted", types.OCIManifestSchema1,
		plantingManifest(t, o.Addr, imgB, peers.TokenAdmin, admin, func(m map[string]any) {
			m["artifactType"] = sigType
			m["subject"] = map[string]any{"mediaType": ocispec.MediaTypeImageManifest, "digest": imgA.Digest, "size": 1}
		}), "team-b", tenantPasswords["team-b"])
	entries := []ocispec.Descriptor{{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: sigType, Digest: digest.Digest(planted), Size: 1}}
	withA := append(entries, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageManifest, ArtifactType: sigType, Digest: digest.Digest(sigA), Size: 1})
	tag := "team-b/app:sha256-" + digest.Digest(imgA.Digest).Encoded()
	if err := putIndex(o.Addr, tag, withA, "team-b", tenantPasswords["team-b"]); err != nil {
		t.Logf("the origin refuses an index listing A's signature in B's repository (%v): B plants its own only", err)
		if err := putIndex(o.Addr, tag, entries, "team-b", tenantPasswords["team-b"]); err != nil {
			t.Fatal(err)
		}
	}

	// A's list is A's repository's, whatever B planted in its own (cached and fresh).
	for _, fresh := range []bool{false, true} {
		hdr := a
		if fresh {
			hdr = tokenHeader(t, o, "team-a", "repository:team-a/app:pull")
		}
		idx, _ := referrersOf(t, c, o.Addr, "team-a/app", imgA.Digest, "", hdr)
		if got := referrerSet(idx); len(got) != 1 || got[sigA] != sigType {
			t.Fatalf("A's referrers after B's planting = %v", got)
		}
	}
	// B's list in B's repository is the origin's (what B planted), and naming A's digests
	// there unlocks none of A's cached bytes in B's repository.
	idx, _ = referrersOf(t, c, o.Addr, "team-b/app", imgA.Digest, "", b)
	if got := referrerSet(idx); got[planted] != sigType {
		t.Fatalf("B's referrers = %v, want its planted %s", got, planted)
	}
	for _, d := range []string{sigA, imgA.Digest} {
		sameAsOrigin(t, c, o.Addr, "/v2/team-b/app/manifests/"+d, b, d)
	}
	for _, d := range []string{imgA.Config, imgA.Layers[0]} {
		sameAsOrigin(t, c, o.Addr, "/v2/team-b/app/blobs/"+d, b, d)
	}
	refused("after the planting")
}

// putIndex pushes an image index listing entries to registryAddr/repoAndTag as user.
func putIndex(registryAddr, repoAndTag string, entries []ocispec.Descriptor, user, password string) error {
	body, err := json.Marshal(ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex, Manifests: entries})
	if err != nil {
		return err
	}
	ref, err := name.ParseReference(registryAddr+"/"+repoAndTag, name.Insecure)
	if err != nil {
		return err
	}
	return remote.Put(ref, rawManifest{body, types.OCIImageIndex}, remote.WithAuth(basicOrAnonymous(user, password)))
}
