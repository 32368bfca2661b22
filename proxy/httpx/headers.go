package httpx

import (
	"net/http"
	"strings"
)

// RelayedResponseHeaders are the origin response headers passed back to the client. An
// allow-list, not a deny-list: hop-by-hop headers, cookies and anything the origin sets for
// itself (Location pointing at its storage, for example) stay behind.
var RelayedResponseHeaders = []string{
	"Content-Type",
	"Content-Length",
	"Content-Range",
	"Accept-Ranges",
	"Docker-Content-Digest",
	"Docker-Distribution-Api-Version",
	"Www-Authenticate",
	"Etag",
	"Last-Modified",
	"Retry-After",
	"Link",
	"Oci-Filters-Applied",
}

// CopyRelayed copies the allow-listed headers from an origin response.
func CopyRelayed(dst, src http.Header) {
	for _, k := range RelayedResponseHeaders {
		if v, ok := src[k]; ok {
			dst[k] = append([]string(nil), v...)
		}
	}
}

// OriginRequestHeaders builds the headers of a request to the origin from the client's.
//
// Only what changes the answer is forwarded: credentials (the origin decides who may read),
// Accept (manifest media type negotiation), and Range when the caller asks for it.
// Accept-Encoding is pinned to identity: a compressed manifest or blob would reach us
// decoded or not depending on the client, and its digest would not match.
func OriginRequestHeaders(client http.Header) http.Header {
	h := http.Header{}
	if v := client.Values("Authorization"); len(v) > 0 {
		h["Authorization"] = append([]string(nil), v...)
	}
	if v := client.Values("Accept"); len(v) > 0 {
		h["Accept"] = append([]string(nil), v...)
	}
	h.Set("Accept-Encoding", "identity")
	h.Set("User-Agent", "cove-cache")
	return h
}

// CredentialKey is the form of the client's credentials used as a cache key: the raw
// Authorization value, never logged, never stored at rest; callers hash it.
func CredentialKey(client http.Header) string {
	return strings.Join(client.Values("Authorization"), "\n")
}
