package fill

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// An origin connection that drops, or stalls, in the middle of a body does not fail the
// fill: it asks the origin again for the bytes it lacks (FetchFunc with from > 0, a
// "Range: bytes=from-" request) and goes on appending them, with the digest state of the
// bytes it has. The blob is still verified end to end, and the last byte still withheld
// until it is; clients see one uninterrupted body.
//
// The answer must be a 206 whose Content-Range starts at the first missing byte and
// gives the blob's size. A 200 (the origin ignored the range) is the whole body again:
// the fill starts over with it only while no reader has been given a byte, since the
// bytes they have could differ from the new body's; otherwise it fails. A fill whose
// origin sent no Content-Length is not resumed: there is no size to check against.

// errCut marks a body cut short: a resume may fetch the rest.
var errCut = errors.New("origin body cut short")

// Resume policy: at most maxResumes origin requests after the first, each after a
// backoff growing by resumeBackoff.
var (
	maxResumes    = 3
	resumeBackoff = 200 * time.Millisecond
)

// Resume results, the values Events.Resume is called with.
const (
	ResumeRanged    = "ranged"    // a 206 continued the body
	ResumeRestarted = "restarted" // a 200 started the body over (no reader had a byte)
	ResumeFailed    = "failed"    // the fill gave up on resuming
)

// bodyState is what a fill knows of its origin body across resumes. Only the fill's
// goroutine touches it.
type bodyState struct {
	verifier digest.Verifier
	received int64
	resumes  int   // origin requests made to resume
	first    error // why the body was first cut short
	outcome  string
}

// resume fetches the rest of a body that ended with err. It returns the new body's
// request context and response, or the error that ends the fill. It asks with the fill's
// current credential, which may be another joiner's than the first request's
// (handover.go).
func (f *Fill) resume(ctx context.Context, st *bodyState, err error) (context.Context, context.CancelCauseFunc, *http.Response, error) {
	if !errors.Is(err, errCut) || f.size < 0 || ctx.Err() != nil {
		return nil, nil, nil, err
	}
	if st.first == nil {
		st.first = err
	}
	for {
		if st.resumes >= maxResumes {
			return nil, nil, nil, f.resumeFailed(st, fmt.Errorf("%w (after %d resumes)", err, st.resumes))
		}
		st.resumes++
		t := time.NewTimer(time.Duration(st.resumes) * resumeBackoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, nil, nil, context.Cause(ctx)
		}
		attempt, stop := context.WithCancelCause(ctx)
		res, ferr := f.originFetch(attempt, st.received, -1)
		if errors.Is(ferr, errCredential) {
			stop(nil)
			return nil, nil, nil, f.resumeFailed(st, ferr)
		}
		if ferr != nil {
			stop(nil)
			err = fmt.Errorf("%w: resume at byte %d: %w", errCut, st.received, ferr)
			continue // the origin may be back in a moment: another try, while any are left
		}
		if berr := f.resumeAnswer(res, st); berr != nil {
			res.Body.Close()
			stop(nil)
			return nil, nil, nil, f.resumeFailed(st, berr)
		}
		return attempt, stop, res, nil
	}
}

// resumeAnswer checks the origin's answer to a resume request for the bytes from
// st.received, starts the body over for a 200 when it may, and counts the resume.
func (f *Fill) resumeAnswer(res *http.Response, st *bodyState) error {
	outcome, err := f.restAnswer(res, st)
	if err != nil {
		return err
	}
	f.m.resumed(outcome)
	st.outcome = outcome
	return nil
}

// restAnswer checks the origin's answer to a request for the bytes from st.received on,
// and starts the body over for a 200 when it may: ResumeRanged for a 206 that goes on
// from there, ResumeRestarted for a 200 that starts over.
func (f *Fill) restAnswer(res *http.Response, st *bodyState) (string, error) {
	switch res.StatusCode {
	case http.StatusPartialContent:
		cr := res.Header.Get("Content-Range")
		start, total, ok := parseContentRange(cr)
		if !ok || start != st.received || total != f.size {
			return "", fmt.Errorf("origin answered a resume at byte %d of %d with Content-Range %q", st.received, f.size, cr)
		}
		if res.ContentLength >= 0 && res.ContentLength != f.size-st.received {
			return "", fmt.Errorf("origin answered a resume at byte %d of %d with %d bytes", st.received, f.size, res.ContentLength)
		}
		return ResumeRanged, nil
	case http.StatusOK:
		if res.ContentLength != f.size {
			return "", fmt.Errorf("origin answered a resume with a %d-byte body for a %d-byte blob", res.ContentLength, f.size)
		}
		// From byte 0 the whole body is the answer asked for: nothing to start over.
		if st.received > 0 && !f.startOver() {
			return "", fmt.Errorf("origin ignored the range of a resume at byte %d, and clients have bytes already", st.received)
		}
		st.verifier = f.Key.Digest.Verifier()
		st.received = 0
		return ResumeRestarted, nil
	}
	return "", fmt.Errorf("origin answered a resume at byte %d with %d", st.received, res.StatusCode)
}

func (f *Fill) resumeFailed(st *bodyState, err error) error {
	f.m.resumed(ResumeFailed)
	st.outcome = ResumeFailed
	return err
}

// startOver forgets every byte received, unless a reader was given one.
func (f *Fill) startOver() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.sent {
		return false
	}
	f.received, f.spooled = 0, 0
	if f.win != nil {
		f.win = newWindow(len(f.win.buf), 0)
	}
	f.notify()
	return true
}

// parseContentRange parses "bytes start-end/total" with a known total.
func parseContentRange(v string) (start, total int64, ok bool) {
	rest, found := strings.CutPrefix(v, "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, tot, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	s, e, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	start, err1 := strconv.ParseInt(s, 10, 64)
	end, err2 := strconv.ParseInt(e, 10, 64)
	total, err3 := strconv.ParseInt(tot, 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || start < 0 || end < start || end >= total || end != total-1 {
		return 0, 0, false
	}
	return start, total, true
}

// resumed counts one resume result.
func (m *Manager) resumed(result string) {
	if fn := m.events.Resume; fn != nil {
		fn(result)
	}
}

// logResumes logs, once per fill, that its origin body was resumed, and how it ended.
func (f *Fill) logResumes(st *bodyState, err error) {
	if st.resumes == 0 {
		return
	}
	args := []any{"registry", f.Key.Registry, "digest", f.Key.Digest, "size", f.size,
		"resumes", st.resumes, "outcome", st.outcome, "cause", redact(st.first)}
	if err != nil {
		f.m.log.Warn("origin connection dropped mid-body: resume failed", append(args, "error", redact(err))...)
		return
	}
	f.m.log.Info("origin connection dropped mid-body: fill resumed", args...)
}

// redact drops the URL (with its query: pre-signed blob URLs carry credentials) from an
// error of an HTTP request.
func redact(err error) string {
	if err == nil {
		return ""
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		return strings.ReplaceAll(err.Error(), ue.URL, "<url>")
	}
	return err.Error()
}
