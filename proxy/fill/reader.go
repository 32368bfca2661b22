package fill

import (
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"sync"
)

// NewReader reads bytes [off, off+n) of the blob as they arrive (n < 0: to the end). A
// failed fill ends the read with an error wrapping ErrFailed, never with a clean EOF; a
// reader cut off behind a pass-through fill's window ends with ErrBehind.
func (f *Fill) NewReader(ctx context.Context, off, n int64) io.Reader {
	return f.newReader(ctx, off, n, false)
}

// newReader makes a reader; bounded: see NewRangeReader.
func (f *Fill) newReader(ctx context.Context, off, n int64, bounded bool) *reader {
	end := off + n
	if n < 0 {
		end = math.MaxInt64
	}
	r := &reader{f: f, ctx: ctx, off: off, end: end, bounded: bounded}
	f.mu.Lock()
	r.gen = f.starveGen
	f.readers[r] = struct{}{}
	f.unhold(off)
	f.moved()
	f.mu.Unlock()
	// A client that goes away without reading to the end leaves at once: a pass-through
	// fill must not wait for it.
	r.stop = context.AfterFunc(ctx, r.leave)
	return r
}

type reader struct {
	f   *Fill
	ctx context.Context
	// off is the next byte to read, end the first one not to; both guarded by f.mu, so a
	// pass-through fill can see where its readers are.
	off, end int64
	cut      bool // fell behind a pass-through window (guarded by f.mu)
	bounded  bool // a range a client asked for (NewRangeReader)
	gen      int  // the fill's starveGen when made (guarded by f.mu)

	stop     func() bool
	doneOnce sync.Once
}

// source says where the bytes at a reader's offset are.
type source int

const (
	fromSpool  source = iota // in the spool file
	fromWindow               // in a pass-through fill's window (copied, when given room)
	atEnd                    // the verified blob ended at the offset
)

// next waits until bytes past r.off are readable and says where: in the spool up to
// spoolEnd (returned with the spool file), or in the window, in which case it copies up
// to len(p) of them into p and advances the reader by n. The last byte is withheld until
// the body is verified.
func (r *reader) next(p []byte) (src source, spoolEnd int64, file *os.File, n int, err error) {
	f := r.f
	f.mu.Lock()
	defer f.mu.Unlock()
	for {
		if r.cut {
			return 0, 0, nil, 0, fmt.Errorf("%w at byte %d of %s", ErrBehind, r.off, f.Key.Digest)
		}
		if f.err != nil {
			return 0, 0, nil, 0, f.err
		}
		avail := f.readable(r)
		if r.off < avail {
			if spooled := f.spoolEnd(avail); r.off < spooled {
				if f.file == nil {
					return 0, 0, nil, 0, fmt.Errorf("%w: spool closed", ErrFailed)
				}
				f.sent = true
				return fromSpool, min(avail, spooled, r.end), f.file, 0, nil
			}
			if f.win != nil && r.off >= f.win.lo {
				if len(p) == 0 {
					return fromWindow, 0, nil, 0, nil
				}
				n = f.win.read(p[:min(int64(len(p)), avail-r.off, r.end-r.off)], r.off)
				r.off += int64(n)
				f.sent = f.sent || n > 0
				f.moved()
				return fromWindow, 0, nil, n, nil
			}
			f.cutOff(r)
			continue
		}
		if f.verified {
			return atEnd, 0, nil, 0, nil
		}
		if f.starving && r.gen < f.starveGen {
			// Its client's credential may be the one that expired: it comes back with a
			// fresh one (handover.go).
			return 0, 0, nil, 0, fmt.Errorf("%w: at byte %d of %s", ErrCredentialWait, r.off, f.Key.Digest)
		}
		f.wantAhead(r.off) // a fill fetched in ranges fetches them at once (ahead.go)
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ch:
			f.mu.Lock()
		case <-r.ctx.Done():
			f.mu.Lock()
			return 0, 0, nil, 0, r.ctx.Err()
		}
	}
}

// advance moves r past n bytes it read from the spool.
func (r *reader) advance(n int64) {
	r.f.mu.Lock()
	r.off += n
	r.f.moved()
	r.f.mu.Unlock()
}

// leave unregisters r: the fill no longer waits for it.
func (r *reader) leave() {
	r.f.mu.Lock()
	delete(r.f.readers, r)
	r.f.moved()
	r.f.mu.Unlock()
}

// finish ends r once: it leaves, and stops watching its context.
func (r *reader) finish() {
	r.doneOnce.Do(func() {
		r.stop()
		r.leave()
	})
}

func (r *reader) position() int64 {
	r.f.mu.Lock()
	defer r.f.mu.Unlock()
	return r.off
}

func (r *reader) Read(p []byte) (int, error) {
	if r.position() >= r.end {
		r.finish()
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	src, spoolEnd, file, n, err := r.next(p)
	if err != nil {
		r.finish()
		return 0, err
	}
	switch src {
	case atEnd:
		r.finish()
		return 0, r.pastEnd()
	case fromWindow:
		return n, nil
	}
	off := r.position()
	want := min(int64(len(p)), spoolEnd-off)
	got, rerr := file.ReadAt(p[:want], off)
	r.advance(int64(got))
	if rerr != nil && !(rerr == io.EOF && int64(got) == want) {
		r.finish()
		return got, fmt.Errorf("%w: read spool: %v", ErrFailed, rerr)
	}
	return got, nil
}

// pastEnd is the end of a read that reached the end of the verified blob: a clean EOF
// for a read to the end, an error for a range that runs past it.
func (r *reader) pastEnd() error {
	if r.end == math.MaxInt64 {
		return io.EOF
	}
	return io.ErrUnexpectedEOF
}

// WriteTo streams the reader's range to w. Bytes already in the spool go with one copy
// per available run, from the reader's own descriptor of the spool file, so a network
// writer can use sendfile(2) instead of 32 KiB user-space copies. Bytes of a
// pass-through fill's window go through a 64 KiB buffer of the reader's own.
func (r *reader) WriteTo(w io.Writer) (int64, error) {
	defer r.finish()
	r.f.mu.Lock()
	file := r.f.file
	r.f.mu.Unlock()
	var own *os.File
	if file != nil {
		// /proc/self/fd keeps working after the spool is renamed into storage, and gives
		// this reader a file offset of its own.
		own, _ = os.Open(fmt.Sprintf("/proc/self/fd/%d", file.Fd()))
	}
	if own != nil {
		defer own.Close()
	}
	var buf []byte
	var total int64
	for r.position() < r.end {
		src, spoolEnd, file, n, err := r.next(buf)
		if err != nil {
			return total, err
		}
		switch src {
		case atEnd:
			if err := r.pastEnd(); err != io.EOF {
				return total, err
			}
			return total, nil
		case fromWindow:
			if buf == nil {
				buf = make([]byte, 64<<10)
				continue
			}
			m, err := w.Write(buf[:n])
			total += int64(m)
			if err != nil {
				return total, err
			}
			continue
		}
		off := r.position()
		want := spoolEnd - off
		var c int64
		if own != nil {
			if _, err := own.Seek(off, io.SeekStart); err != nil {
				return total, fmt.Errorf("%w: seek spool: %v", ErrFailed, err)
			}
			c, err = io.Copy(w, io.LimitReader(own, want))
		} else {
			c, err = io.Copy(w, io.NewSectionReader(file, off, want))
		}
		r.advance(c)
		total += c
		if err != nil {
			return total, err
		}
		if c != want {
			return total, fmt.Errorf("%w: short spool read", ErrFailed)
		}
	}
	return total, nil
}
