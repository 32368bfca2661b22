package preheat

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// barInterval is how often the terminal bar is redrawn.
const barInterval = 100 * time.Millisecond

// Progress shows what Run does: on a terminal, a bar redrawn in place (bytes, rate,
// blobs done) with events printed above it; otherwise one plain line per event.
type Progress struct {
	w   io.Writer
	tty bool

	bytes atomic.Int64

	mu        sync.Mutex
	start     time.Time
	blobs     int
	doneBlobs int
	total     int64
	stop      chan struct{}
	stopped   chan struct{}
}

// NewProgress writes progress to w (nil: nowhere); tty selects the bar.
func NewProgress(w io.Writer, tty bool) *Progress {
	if w == nil {
		w = io.Discard
	}
	return &Progress{w: w, tty: tty, start: time.Now()}
}

// Resolved reports a target whose manifests are all fetched.
func (p *Progress) Resolved(ref string, d digest.Digest, manifests, blobs int, bytes int64) {
	p.line(fmt.Sprintf("resolved %s: %s (%s)", ref, d, Counts(manifests, blobs, bytes)))
}

// Failed reports a target that failed before its blobs.
func (p *Progress) Failed(ref string, err error) {
	p.line(fmt.Sprintf("failed %s: %v", ref, err))
}

// Begin starts the blob phase: blobs to fetch, total bytes.
func (p *Progress) Begin(blobs int, total int64) {
	p.mu.Lock()
	p.blobs, p.total, p.start = blobs, total, time.Now()
	p.mu.Unlock()
	if !p.tty {
		p.line(fmt.Sprintf("fetching %s (%s) through the cache", plural(blobs, "blob"), Size(total)))
		return
	}
	p.stop, p.stopped = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(p.stopped)
		t := time.NewTicker(barInterval)
		defer t.Stop()
		for {
			p.mu.Lock()
			p.drawBar()
			p.mu.Unlock()
			select {
			case <-t.C:
			case <-p.stop:
				return
			}
		}
	}()
}

// Add counts n bytes read (negative: taken back after a failure).
func (p *Progress) Add(n int64) { p.bytes.Add(n) }

// BlobDone reports a blob read and verified, or failed.
func (p *Progress) BlobDone(d ocispec.Descriptor, err error) {
	p.mu.Lock()
	p.doneBlobs++
	done, blobs, total := p.doneBlobs, p.blobs, p.total
	p.mu.Unlock()
	switch {
	case err != nil:
		p.line(fmt.Sprintf("failed %v", err))
	case !p.tty:
		p.line(fmt.Sprintf("blob %s %s [%d/%d blobs, %s of %s]", short(d.Digest), Size(d.Size), done, blobs, Size(p.bytes.Load()), Size(total)))
	}
}

// End stops the bar, leaving its last state on screen.
func (p *Progress) End() {
	if p.stop == nil {
		return
	}
	close(p.stop)
	<-p.stopped
	p.mu.Lock()
	p.drawBar()
	fmt.Fprint(p.w, "\n")
	p.stop = nil
	p.mu.Unlock()
}

// Bytes is what has been read and verified so far.
func (p *Progress) Bytes() int64 { return p.bytes.Load() }

// line prints one event; on a terminal above the bar, which is redrawn under it.
func (p *Progress) line(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tty && p.stop != nil {
		fmt.Fprintf(p.w, "\r\x1b[K%s\n", s)
		p.drawBar()
		return
	}
	fmt.Fprintln(p.w, s)
}

// drawBar redraws the bar in place; p.mu is held.
func (p *Progress) drawBar() {
	const width = 30
	got := p.bytes.Load()
	frac := 1.0
	if p.total > 0 {
		frac = min(max(float64(got)/float64(p.total), 0), 1)
	}
	fill := int(frac * width)
	bar := strings.Repeat("=", fill)
	if fill < width {
		bar += ">" + strings.Repeat(" ", width-fill-1)
	}
	fmt.Fprintf(p.w, "\r\x1b[K[%s] %3.0f%% %s / %s  %s/s  blobs %d/%d",
		bar, frac*100, Size(got), Size(p.total), Size(rate(got, time.Since(p.start))), p.doneBlobs, p.blobs)
}

// rate is bytes per second over elapsed.
func rate(n int64, elapsed time.Duration) int64 {
	if elapsed <= 0 {
		return 0
	}
	return int64(float64(n) / elapsed.Seconds())
}

// Rate is bytes per second since Begin.
func (p *Progress) Rate() int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return rate(p.bytes.Load(), time.Since(p.start))
}

// Size formats a byte count in binary units (12.0 MiB).
func Size(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// Counts says "2 manifests, 4 blobs, 12.0 MiB".
func Counts(manifests, blobs int, bytes int64) string {
	return plural(manifests, "manifest") + ", " + plural(blobs, "blob") + ", " + Size(bytes)
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// short is a digest cut to 12 hex digits, as docker shows them.
func short(d digest.Digest) string {
	s := d.String()
	if i := strings.IndexByte(s, ':'); i >= 0 && len(s) > i+13 {
		return s[:i+13]
	}
	return s
}
