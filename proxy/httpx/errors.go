package httpx

import (
	"encoding/json"
	"net/http"
)

// WriteError answers with the distribution spec's error body:
// {"errors":[{"code":"...","message":"..."}]}. Messages never contain credentials: callers
// pass only validated request parts and fixed text.
func WriteError(w http.ResponseWriter, status int, code, message string) {
	body, _ := json.Marshal(struct {
		Errors []errorEntry `json:"errors"`
	}{Errors: []errorEntry{{Code: code, Message: message}}})
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Del("Content-Length")
	h.Del("Docker-Content-Digest")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

type errorEntry struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}
