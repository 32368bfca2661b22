package httpx

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/containerd/errdefs"
)

func TestWriteErr(t *testing.T) {
	for _, tc := range []struct {
		err          error
		status       int
		code, detail string
	}{
		{InvalidArgument("bad scope"), http.StatusBadRequest, "UNSUPPORTED", "bad scope"},
		{Unauthenticated("expired"), http.StatusUnauthorized, "UNAUTHORIZED", "expired"},
		{PermissionDenied("other registry"), http.StatusForbidden, "DENIED", "other registry"},
		{fmt.Errorf("wrapped: %w", PermissionDenied("x")), http.StatusForbidden, "DENIED", "wrapped: x"},
		{fmt.Errorf("%w: down", errdefs.ErrUnavailable), http.StatusServiceUnavailable, "UNAVAILABLE", "unavailable: down"},
		{errors.New("plain"), http.StatusInternalServerError, "UNKNOWN", "plain"},
	} {
		rec := httptest.NewRecorder()
		WriteErr(rec, tc.err)
		var body struct{ Errors []errorEntry }
		if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || len(body.Errors) != 1 {
			t.Fatalf("%v: body %q", tc.err, rec.Body.String())
		}
		if rec.Code != tc.status || body.Errors[0].Code != tc.code || body.Errors[0].Message != tc.detail {
			t.Errorf("%v: %d %+v, want %d %s %q", tc.err, rec.Code, body.Errors[0], tc.status, tc.code, tc.detail)
		}
	}
}
