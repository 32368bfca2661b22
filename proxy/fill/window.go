package fill

import (
	"context"
	"time"
)

// A fill whose blob the store did not take passes it through: it stops writing the spool
// and keeps the most recent bytes of the body in a window, a ring buffer of fixed size
// (WithPassThroughWindow). Readers read bytes [0, spooled) from the spool, as before,
// and later bytes from the window, so the fill's memory stays at the window's size
// whatever the blob's.
//
// Flow control: before it overwrites bytes a reader still needs, the fill waits for that
// reader (at most the lag, WithPassThroughLag), so readers that keep moving slow the
// fill down to their pace, as one TCP connection would, and keep the one origin fetch. A
// reader still behind after the lag is cut off with ErrBehind: its client sees a broken
// transfer and resumes with a Range request, which starts a fresh fill (JoinAt).

// window holds bytes [lo, hi) of a body in a ring.
type window struct {
	buf    []byte
	lo, hi int64
}

func newWindow(size int, from int64) *window {
	return &window{buf: make([]byte, size), lo: from, hi: from}
}

// put appends p (at most len(buf) bytes) at hi, dropping the oldest bytes.
func (w *window) put(p []byte) {
	size := int64(len(w.buf))
	for len(p) > 0 {
		at := w.hi % size
		n := copy(w.buf[at:], p)
		p = p[n:]
		w.hi += int64(n)
	}
	w.lo = max(w.lo, w.hi-size)
}

// read copies bytes from off (lo <= off < hi) into p and returns how many.
func (w *window) read(p []byte, off int64) int {
	size := int64(len(w.buf))
	n := 0
	for n < len(p) && off < w.hi {
		at := off % size
		c := min(int64(len(p)-n), size-at, w.hi-off)
		copy(p[n:n+int(c)], w.buf[at:at+c])
		n += int(c)
		off += c
	}
	return n
}

// serves reports whether a new reader from byte from on can be served by f: every byte
// it will need is still in the spool, the window, or yet to come. f.mu must not be held.
func (f *Fill) serves(from int64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.pass || f.win == nil || f.err != nil {
		return f.err == nil
	}
	return max(from, f.spooled) >= f.win.lo
}

// A hold stands for a caller that joined from byte pos and has not made its reader yet
// (it waits for the origin's answer, asks the origin whether it may read): the window
// waits for it as for a reader, until its reader takes its place or the lag has passed.
type hold struct {
	pos   int64
	until time.Time
}

// hold records a joiner from byte pos; f.mu must not be held.
func (f *Fill) hold(pos int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pruneHolds()
	f.holds = append(f.holds, hold{pos: pos, until: time.Now().Add(f.m.lag)})
}

// unhold drops the hold a reader from byte off replaces: the highest at or before off,
// else the first; f.mu must be held.
func (f *Fill) unhold(off int64) {
	f.pruneHolds()
	best := -1
	for i, h := range f.holds {
		if h.pos <= off && (best < 0 || h.pos > f.holds[best].pos) {
			best = i
		}
	}
	if best < 0 && len(f.holds) > 0 {
		best = 0
	}
	if best >= 0 {
		f.holds = append(f.holds[:best], f.holds[best+1:]...)
	}
}

// pruneHolds drops expired holds; f.mu must be held.
func (f *Fill) pruneHolds() {
	now := time.Now()
	kept := f.holds[:0]
	for _, h := range f.holds {
		if now.Before(h.until) {
			kept = append(kept, h)
		}
	}
	f.holds = kept
}

// need is the first byte r will want from the window; f.mu must be held.
func (f *Fill) need(r *reader) int64 { return max(r.off, f.spooled) }

// passThrough switches f to passing its blob through from the bytes it has spooled on;
// the spool's name goes at once (its descriptor stays open for readers of its bytes).
func (f *Fill) passThrough() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.pass {
		return
	}
	f.pass = true
	f.win = newWindow(f.m.window, f.spooled)
	f.progress = make(chan struct{})
	if f.file != nil {
		_ = removeName(f.file)
	}
	f.notify()
}

// pushWindow adds p (at most the window's size) to a pass-through fill, first waiting,
// at most the lag, for readers that still need the bytes it overwrites, and cutting off
// the ones still behind then. It returns the context's error if the fill is cancelled.
func (f *Fill) pushWindow(ctx context.Context, p []byte) error {
	var deadline time.Time
	for {
		f.mu.Lock()
		newLo := max(f.win.lo, f.win.hi+int64(len(p))-int64(len(f.win.buf)))
		behind := false
		for r := range f.readers {
			need := f.need(r)
			if r.cut || need >= r.end || need >= newLo {
				continue
			}
			if need < f.win.lo {
				f.cutOff(r) // already lost: no reason to wait for it
				continue
			}
			behind = true
		}
		f.pruneHolds()
		for _, h := range f.holds {
			if need := max(h.pos, f.spooled); need < newLo && need >= f.win.lo {
				behind = true
			}
		}
		if deadline.IsZero() {
			deadline = time.Now().Add(f.m.lag)
		}
		if !behind || !time.Now().Before(deadline) {
			for r := range f.readers {
				if need := f.need(r); !r.cut && need < r.end && need < newLo {
					f.cutOff(r)
				}
			}
			kept := f.holds[:0] // past the lag: a joiner behind reads too late, and is cut off
			for _, h := range f.holds {
				if max(h.pos, f.spooled) >= newLo {
					kept = append(kept, h)
				}
			}
			f.holds = kept
			f.win.put(p)
			f.received += int64(len(p))
			f.waiting = false
			f.notify()
			f.mu.Unlock()
			return nil
		}
		f.waiting = true
		ch := f.progress
		f.mu.Unlock()
		t := time.NewTimer(time.Until(deadline))
		select {
		case <-ch:
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return context.Cause(ctx)
		}
		t.Stop()
	}
}

// cutOff ends r with ErrBehind; f.mu must be held.
func (f *Fill) cutOff(r *reader) {
	r.cut = true
	delete(f.readers, r)
	if fn := f.m.events.ReaderCut; fn != nil {
		fn()
	}
	f.m.log.Debug("reader fell behind a pass-through fill: cut off, its client resumes",
		"registry", f.Key.Registry, "digest", f.Key.Digest, "at", r.off)
}

// moved tells a waiting fill that a reader moved or left; f.mu must be held.
func (f *Fill) moved() {
	if f.waiting {
		f.waiting = false
		close(f.progress)
		f.progress = make(chan struct{})
	}
}
