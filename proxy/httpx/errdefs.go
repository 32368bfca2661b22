package httpx

import (
	"net/http"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errhttp"
)

// WriteErr answers with err as a distribution error: the status from its errdefs class
// (containerd's errhttp mapping, the one place classes become statuses) and the
// distribution error code for that status. err's message is shown to the client, so it
// must hold no credential; a Message error keeps the class out of the text.
func WriteErr(w http.ResponseWriter, err error) {
	status := errhttp.ToHTTP(err)
	code := ErrorCode(status, "")
	switch {
	case errdefs.IsInvalidArgument(err):
		code = "UNSUPPORTED"
	case errdefs.IsUnavailable(err):
		code = "UNAVAILABLE"
	}
	WriteError(w, status, code, err.Error())
}

// Message is an error of an errdefs class whose text is only its message.
type Message struct {
	Class error // an errdefs error: errdefs.ErrInvalidArgument, ...
	Text  string
}

func (e *Message) Error() string { return e.Text }
func (e *Message) Unwrap() error { return e.Class }

// Constructors for the classes cove answers with.
func InvalidArgument(text string) error  { return &Message{errdefs.ErrInvalidArgument, text} }
func Unauthenticated(text string) error  { return &Message{errdefs.ErrUnauthenticated, text} }
func PermissionDenied(text string) error { return &Message{errdefs.ErrPermissionDenied, text} }

// ErrorCode is the distribution error code for an error status; path (a request path,
// may be empty) tells a manifest from a blob for 404.
func ErrorCode(status int, path string) string {
	switch status {
	case http.StatusUnauthorized:
		return "UNAUTHORIZED"
	case http.StatusForbidden:
		return "DENIED"
	case http.StatusNotFound:
		switch {
		case strings.Contains(path, "/manifests/"):
			return "MANIFEST_UNKNOWN"
		case strings.Contains(path, "/blobs/"):
			return "BLOB_UNKNOWN"
		}
		return "NAME_UNKNOWN"
	case http.StatusTooManyRequests:
		return "TOOMANYREQUESTS"
	}
	return "UNKNOWN"
}
