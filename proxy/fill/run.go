package fill

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/containerd/errdefs"
)

func (f *Fill) run(fetch FetchFunc) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	release := func(bool) {}
	st := &bodyState{verifier: f.Key.Digest.Verifier()}
	err := f.fetch(ctx, fetch, st, &release)
	if err != nil {
		f.fail(err)
		f.m.log.Warn("fill failed", "registry", f.Key.Registry, "digest", f.Key.Digest, "error", err)
	}
	f.logResumes(st, err)
	f.mu.Lock()
	resp, pass := f.resp, f.pass
	f.mu.Unlock()
	stored := false
	if err == nil && resp != nil && resp.Status == http.StatusOK && !pass {
		if cerr := f.m.commit(ctx, f, f.file.Name()); cerr != nil {
			// Clients were served a verified body; only the cache copy is lost.
			f.m.storeFailed(f, f.Size(), "commit", cerr)
		} else {
			stored = true
			f.m.storeOK(f.Size())
		}
	}
	release(stored)
	if f.m.onDone != nil {
		var doneErr error
		f.mu.Lock()
		doneErr = f.err
		f.mu.Unlock()
		f.m.onDone(f, doneErr)
	}
	if stored {
		f.forgetStored()
	} else {
		f.forget()
	}
	close(f.settled)
	f.Release()
}

// fetch makes the origin request and streams its body into the spool, or, when the store
// cannot take the blob, through the window; a body cut short is resumed (resume.go).
// *release is set to the reservation's release.
func (f *Fill) fetch(ctx context.Context, fetch FetchFunc, st *bodyState, release *func(bool)) error {
	attempt, stop := context.WithCancelCause(ctx)
	res, err := fetch(attempt, 0, -1)
	if err != nil {
		stop(nil)
		return err
	}
	if res.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
		res.Body.Close()
		stop(nil)
		f.forget()
		f.mu.Lock()
		f.resp = &Response{Status: res.StatusCode, Header: res.Header.Clone(), Body: body}
		f.err = fmt.Errorf("%w: %w: origin answered %d", ErrFailed, ErrRefused, res.StatusCode)
		f.notify()
		f.mu.Unlock()
		return nil
	}
	file, passReason := f.openSpool(ctx, res.ContentLength, release)
	f.mu.Lock()
	f.file = file
	f.resp = &Response{Status: res.StatusCode, Header: res.Header.Clone()}
	f.size = res.ContentLength
	f.notify()
	f.mu.Unlock()
	if passReason != "" {
		f.passThrough()
		f.m.passedThrough(passReason)
	}
	if passReason == "" && f.m.inRanges(res.ContentLength) {
		return f.fetchRanges(ctx, res, attempt, stop, st) // parallel.go
	}
	return f.streamBody(ctx, attempt, stop, res, st)
}

// streamBody reads res's body (attempt's, which stop ends) into the fill from
// st.received on, resuming it when it is cut short, and verifies the whole blob.
func (f *Fill) streamBody(ctx, attempt context.Context, stop context.CancelCauseFunc, res *http.Response, st *bodyState) error {
	buf := make([]byte, f.m.bufSize)
	for {
		err := f.readBody(ctx, attempt, stop, res.Body, buf, st)
		res.Body.Close()
		stop(nil)
		if err == nil {
			break
		}
		if attempt, stop, res, err = f.resume(ctx, st, err); err != nil {
			return err
		}
	}
	if !st.verifier.Verified() {
		return fmt.Errorf("%w: origin body does not match its digest", errdefs.ErrFailedPrecondition)
	}
	f.mu.Lock()
	f.size = st.received
	f.verified = true
	f.notify()
	f.mu.Unlock()
	return nil
}

// readBody reads one origin body into the fill, from st.received on, until it ends. An
// error wrapping errCut is a body cut short (a dropped connection, a stall, an early
// end), which may be resumed; any other ends the fill. attempt is the body's request
// context: stop cancels it when the origin stalls.
func (f *Fill) readBody(ctx, attempt context.Context, stop context.CancelCauseFunc, body io.Reader, buf []byte, st *bodyState) error {
	// A stalled origin body would hang every reader: cancel the request when no byte
	// arrives for stallTimeout.
	stall := time.AfterFunc(f.m.stallTimeout, func() {
		stop(fmt.Errorf("origin sent no data for %s", f.m.stallTimeout))
	})
	defer stall.Stop()
	for {
		// At least roundBytes per round while the origin keeps up: every round is one wake-up
		// of every reader. The buffer is larger still, so one read takes all the socket
		// holds (measured: fewer, larger reads and less CPU per byte). A slow origin's
		// bytes go out after roundWait. A pass-through fill reads at most a quarter of
		// its window at a time, so readers can go on with the rest while it waits.
		chunk := buf
		if f.PassingThrough() {
			chunk = buf[:min(len(buf), f.m.window/4)]
		}
		n, rerr := readRound(body, chunk, min(roundBytes, len(chunk)), roundWait, func() { stall.Reset(f.m.stallTimeout) })
		if rerr == io.ErrUnexpectedEOF {
			rerr = io.EOF
		}
		if n > 0 {
			stall.Stop() // a pass-through fill's wait for its readers is not the origin's stall
			if f.size >= 0 && st.received+int64(n) > f.size {
				return fmt.Errorf("%w: origin sent more than Content-Length %d", errdefs.ErrFailedPrecondition, f.size)
			}
			_, _ = st.verifier.Write(chunk[:n])
			if f.m.onBytes != nil {
				f.m.onBytes(f.Key.Registry, n)
			}
			if err := f.append(ctx, chunk[:n], st.received); err != nil {
				return err
			}
			st.received += int64(n)
			stall.Reset(f.m.stallTimeout)
		}
		if rerr == io.EOF {
			if f.size >= 0 && st.received != f.size {
				return fmt.Errorf("%w: %w: origin sent %d of %d bytes", errCut, errdefs.ErrFailedPrecondition, st.received, f.size)
			}
			return nil
		}
		if rerr != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			if cause := context.Cause(attempt); cause != nil && cause != context.Canceled {
				rerr = cause
			}
			return fmt.Errorf("%w: read origin body: %w", errCut, rerr)
		}
	}
}

// openSpool reserves room for the blob and creates its spool file. A refusal or a
// failure returns no file and the reason to pass the blob through.
func (f *Fill) openSpool(ctx context.Context, size int64, release *func(bool)) (*os.File, string) {
	if f.m.reserve != nil {
		rel, err := f.m.reserve(ctx, f.Key, size)
		if err != nil {
			return nil, f.m.reserveRefused(f, size, err)
		}
		if rel != nil {
			*release = rel
		}
	}
	file, err := os.CreateTemp(f.m.dir, "fill-*")
	if err != nil {
		return nil, f.m.storeFailed(f, size, "create", err)
	}
	if size > 0 {
		// Blocks allocated up front make every spool write and the writeback cheaper
		// (no delayed allocation per page). Best effort: without them a full disk
		// shows at the write, as before.
		preallocate(file, size)
	}
	return file, ""
}

// append makes p, the body's bytes from off, readable: written to the spool, or, once
// the spool failed, put in the window.
func (f *Fill) append(ctx context.Context, p []byte, off int64) error {
	if !f.PassingThrough() {
		var err error
		for w := 0; w < len(p) && err == nil; {
			k := min(len(p)-w, spoolPiece)
			_, err = f.file.WriteAt(p[w:w+k], off+int64(w))
			w += k
		}
		if err == nil {
			f.mu.Lock()
			f.received = off + int64(len(p))
			f.spooled = f.received
			f.notify()
			f.mu.Unlock()
			return nil
		}
		// The bytes before off stay readable from the spool; the rest come through.
		f.passThrough()
		f.m.passedThrough(f.m.storeFailed(f, f.Size(), "write", err))
	}
	// At most a quarter of the window at a time: a reader waiting for the next bytes is
	// never among those the window must wait for.
	for len(p) > 0 {
		n := min(len(p), max(f.m.window/4, 1))
		if err := f.pushWindow(ctx, p[:n]); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// A fill round reads at least roundBytes, or what came within roundWait of the round's
// first byte from a slower origin, before readers see them.
const (
	roundBytes = 512 << 10
	roundWait  = 10 * time.Millisecond
)

// spoolPiece is the most one spool write takes: larger writes cost more CPU per byte
// (measured on ext4, 1 MiB against 256 KiB writes).
const spoolPiece = 256 << 10

// readRound reads body into p until it holds atLeast bytes, the body ends or fails, or
// wait has passed since the round's first byte; got is called after every read that
// brought bytes (the origin is not stalled while it sends, however slowly).
func readRound(body io.Reader, p []byte, atLeast int, wait time.Duration, got func()) (int, error) {
	n := 0
	var first time.Time
	for n < atLeast {
		k, err := body.Read(p[n:])
		if k > 0 {
			n += k
			got()
			if first.IsZero() {
				first = time.Now()
			} else if time.Since(first) >= wait {
				return n, err
			}
		}
		if err != nil {
			return n, err
		}
	}
	return n, nil
}
