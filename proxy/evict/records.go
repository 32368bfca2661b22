package evict

import (
	"encoding/json"
	"strings"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Records that go with a blob (their formats are the server's and package authz's):
//
//	provenance/<alg>/<hex>/<registry>
//	manifesttype/<alg>/<hex>/<registry>
//	membership/<registry>/<repository>/@<alg>:<hex>
//	tag/<registry>/<repository>/@<tag>          (value: JSON with the digest it names)
//
// A tag record goes with the manifest it names: it serves nothing once that manifest is
// gone. Earlier versions wrote member/... and manifest/<alg>/<hex>; nothing reads them,
// and the first sweep removes them (legacyPrefixes).
var (
	ownedPrefixes  = []string{"provenance/", "manifesttype/", "membership/", "tag/"}
	legacyPrefixes = []string{"member/", "manifest/"}
)

// IndexKey is the record the index lives in.
const IndexKey = "evict/index"

// recordDigest names the blob a record goes with.
func recordDigest(key string, value []byte) (digest.Digest, bool) {
	parts := strings.Split(key, "/")
	var d digest.Digest
	switch parts[0] {
	case "provenance", "manifesttype":
		if len(parts) < 4 {
			return "", false
		}
		d = digest.NewDigestFromEncoded(digest.Algorithm(parts[1]), parts[2])
	case "membership":
		last := parts[len(parts)-1]
		if len(parts) < 4 || !strings.HasPrefix(last, "@") {
			return "", false
		}
		d = digest.Digest(last[1:])
	case "tag":
		// The tag record's fields (digest, mediaType) are a descriptor's.
		var desc ocispec.Descriptor
		if len(parts) < 4 || json.Unmarshal(value, &desc) != nil {
			return "", false
		}
		d = desc.Digest
	default:
		return "", false
	}
	if d.Validate() != nil {
		return "", false
	}
	return d, true
}
