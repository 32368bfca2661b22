package server

import (
	"io"
	"net/http"
	"strings"
	"time"
)

// recorder captures what a handler answered, for the access log, without hiding the
// writer's Flush (headers at once) or ReadFrom (sendfile) from the handler.
type recorder struct {
	http.ResponseWriter
	status int
	bytes  int64
}

func (r *recorder) WriteHeader(status int) {
	if r.status == 0 {
		r.status = status
	}
	r.ResponseWriter.WriteHeader(status)
}

func (r *recorder) Write(p []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(p)
	r.bytes += int64(n)
	return n, err
}

func (r *recorder) ReadFrom(src io.Reader) (int64, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	var n int64
	var err error
	if rf, ok := r.ResponseWriter.(io.ReaderFrom); ok {
		n, err = rf.ReadFrom(src)
	} else {
		n, err = io.Copy(r.ResponseWriter, src)
	}
	r.bytes += n
	return n, err
}

func (r *recorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// logRequest writes one debug line per distribution request: method, path (never the
// query's credentials: registries take none there, and headers are not logged), status,
// bytes and duration.
func (s *Server) logRequest(r *http.Request, rec *recorder, start time.Time) {
	s.log.Debug("request",
		"method", r.Method,
		"path", redactHandle(r.URL.Path),
		"ns", r.URL.Query().Get("ns"),
		"range", r.Header.Get("Range"),
		"status", rec.status,
		"bytes", rec.bytes,
		"duration", time.Since(start).String(),
	)
}

// redactHandle cuts an upload handle out of a path for the log: whoever reads the log
// must not be able to continue someone's upload.
func redactHandle(path string) string {
	i := strings.LastIndex(path, "/blobs/uploads/")
	if i < 0 || i+len("/blobs/uploads/") == len(path) {
		return path
	}
	return path[:i] + "/blobs/uploads/<handle>"
}
