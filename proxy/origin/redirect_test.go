package origin

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"
)

const secret = "s3cr3t-signature"

// A registry redirects a blob read to a presigned URL that then fails in every way a real
// one can: the error the client returns, and the one its observer sees, must name no
// query or user information.
func TestErrorsNameNoQuery(t *testing.T) {
	hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done() // never answers: the client's deadline ends it
	}))
	defer hang.Close()
	closed := httptest.NewServer(http.NotFoundHandler())
	closedURL := closed.URL
	closed.Close() // nothing listens there any more: connection refused
	hangHost := strings.TrimPrefix(hang.URL, "http://")

	var target string
	_, reg, _ := countingServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/loop" {
			http.Redirect(w, r, "/loop?X-Amz-Signature="+secret, http.StatusFound)
			return
		}
		w.Header().Set("Location", target)
		w.WriteHeader(http.StatusTemporaryRedirect)
	})
	for _, tt := range []struct {
		name, target, path string
		want               error // errors.Is still holds after redaction
	}{
		{"hangs", hang.URL + "/blob?X-Amz-Signature=" + secret + "&X-Amz-Credential=AKIA", "/v2/a/blobs/sha256:x", context.DeadlineExceeded},
		{"refused", closedURL + "/blob?sig=" + secret, "/v2/a/blobs/sha256:x", nil},
		{"user info", "http://" + secret + ":" + secret + "@" + hangHost + "/blob?sig=" + secret, "/v2/a/blobs/sha256:x", context.DeadlineExceeded},
		{"bad location", "http://[::1/blob?sig=" + secret, "/v2/a/blobs/sha256:x", errBadLocation},
		{"fragment", hang.URL + "/blob#" + secret, "/v2/a/blobs/sha256:x", context.DeadlineExceeded},
		{"redirect loop", "", "/loop", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			target = tt.target
			var observed error
			c := New(WithPlainHTTP(reg), WithObserver(func(_ string, _ int, err error) { observed = err }))
			ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
			defer cancel()
			resp, err := c.Do(ctx, http.MethodGet, reg, tt.path, nil, http.Header{}, nil)
			if err == nil {
				resp.Body.Close()
				t.Fatalf("want an error, got %d", resp.StatusCode)
			}
			for _, e := range []error{err, observed} {
				if e == nil || strings.Contains(e.Error(), secret) || strings.Contains(e.Error(), "AKIA") {
					t.Fatalf("error %v names the secret", e)
				}
			}
			var ue *url.Error
			if !errors.As(err, &ue) || strings.Contains(ue.URL, "?") {
				t.Fatalf("error %#v: want a url.Error without a query", err)
			}
			if tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("error %v is not %v", err, tt.want)
			}
			t.Log(err)
		})
	}

	// Get quotes a URL it rejects, redacted too.
	c := New()
	_, err := c.Get(t.Context(), "https://user:"+secret+"@auth.example/token?scope="+secret, nil)
	if err == nil || strings.Contains(err.Error(), secret) {
		t.Fatalf("Get: %v", err)
	}
}

func TestRedactURL(t *testing.T) {
	for raw, want := range map[string]string{
		"https://u:p@s3.example/b/k?X-Amz-Signature=x#f": "https://s3.example/b/k",
		"/relative?sig=x":         "/relative",
		"https://cdn.example/a?":  "https://cdn.example/a",
		"http://[::1/x?sig=x":     "(unparsable URL)",
		"mailto:someone?subject=": "mailto:(opaque)",
	} {
		if got := redactURL(raw); got != want {
			t.Errorf("redactURL(%q) = %q, want %q", raw, got, want)
		}
	}
}
