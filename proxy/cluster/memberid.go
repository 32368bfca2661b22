package cluster

import (
	"crypto/sha256"
	"encoding/base64"
)

// MemberIDLen is the length of a MemberID.
const MemberIDLen = 11

// MemberID is a short name of a member (its URL as ParseMember gives it), for state that
// lives in one replica and is named in a URL a client holds, such as an upload session's
// handle: any replica that receives it can tell which member holds the state. 66 bits
// of SHA-256, base64url: distinct among any number of replicas a cluster has. It is no
// secret and proves nothing: the holder still checks everything a request names.
func MemberID(member string) string {
	sum := sha256.Sum256([]byte("cove-member-id-v1\x00" + member))
	return base64.RawURLEncoding.EncodeToString(sum[:])[:MemberIDLen]
}

// MemberByID returns the current member whose MemberID is id; false when none is (a
// replica that has left, or a made-up id).
func (r *Ring) MemberByID(id string) (string, bool) {
	if len(id) != MemberIDLen {
		return "", false
	}
	if MemberID(r.self) == id {
		return r.self, true
	}
	for _, m := range r.members.Members() {
		if MemberID(m) == id {
			return m, true
		}
	}
	return "", false
}
