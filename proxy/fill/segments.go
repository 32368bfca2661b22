package fill

import (
	"context"
	"io"
	"sort"
	"strconv"
	"strings"
)

// span is the bytes [lo, hi) of a blob.
type span struct{ lo, hi int64 }

// spans is a sorted set of disjoint, non-adjacent spans: the bytes of a blob a fill
// fetched in ranges has in its spool, or has in its spool or coming.
type spans []span

// add returns s with [lo, hi) in it, merged with its neighbours.
func (s spans) add(lo, hi int64) spans {
	if lo >= hi {
		return s
	}
	i := sort.Search(len(s), func(k int) bool { return s[k].hi >= lo })
	j := i
	for j < len(s) && s[j].lo <= hi {
		lo, hi = min(lo, s[j].lo), max(hi, s[j].hi)
		j++
	}
	if i == j {
		s = append(s, span{})
		copy(s[i+1:], s[i:])
		s[i] = span{lo, hi}
		return s
	}
	s[i] = span{lo, hi}
	return append(s[:i+1], s[j:]...)
}

// end is the end of the span holding off: off itself when none does.
func (s spans) end(off int64) int64 {
	i := sort.Search(len(s), func(k int) bool { return s[k].hi > off })
	if i < len(s) && s[i].lo <= off {
		return s[i].hi
	}
	return off
}

// next is the start of the first span after off (off not in s): limit when none.
func (s spans) next(off, limit int64) int64 {
	i := sort.Search(len(s), func(k int) bool { return s[k].lo > off })
	if i < len(s) {
		return min(s[i].lo, limit)
	}
	return limit
}

// readable is the end of the bytes r may read from r.off on now; f.mu must be held.
//
// A fill fetched in one stream has a prefix of the blob; a fill fetched in ranges has
// spans of it, and r may read the span it is in. Either way the blob's last byte is
// withheld until the whole blob is verified, so a client reading the body to its end
// never gets a complete body that is wrong. A bounded range (NewRangeReader) is not
// held back: a lazy puller (SOCI, stargz) reads a blob's table of contents at its end
// before anything else, and verifies its own chunks; it is served the bytes as they
// arrive, before the whole blob is verified, and a corrupt blob is still never stored.
func (f *Fill) readable(r *reader) int64 {
	if f.par == nil {
		// Only the blob's last byte is held back, as for a fill in ranges: a bounded
		// range that ends where the bytes received end must not wait for the next byte,
		// which a fill passing through after its spool failed asks of the origin only
		// later. With no Content-Length the last byte is not known: one is held back.
		avail := f.received
		if !f.verified && avail > 0 && (f.size < 0 || (avail >= f.size && !r.bounded)) {
			avail--
		}
		return avail
	}
	avail := f.par.have.end(r.off)
	if !f.verified && avail == f.par.size && !r.bounded {
		avail--
	}
	return avail
}

// NewRangeReader reads bytes [off, off+n) of the blob (n >= 0), a range a client asked
// for: it is served as soon as those bytes are in the spool, the blob's last byte too,
// before the whole blob is verified (see readable), and a fill fetched in ranges fetches
// a range far ahead of its progress at once (ahead.go). n < 0 is NewReader's read to
// the end, with the last byte withheld.
func (f *Fill) NewRangeReader(ctx context.Context, off, n int64) io.Reader {
	return f.newReader(ctx, off, n, n >= 0)
}

// parseContentRangeSpan parses "bytes start-end/total" with a known total.
func parseContentRangeSpan(v string) (start, end, total int64, ok bool) {
	rest, found := strings.CutPrefix(v, "bytes ")
	if !found {
		return 0, 0, 0, false
	}
	rng, tot, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, 0, false
	}
	s, e, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, 0, false
	}
	start, err1 := strconv.ParseInt(s, 10, 64)
	end, err2 := strconv.ParseInt(e, 10, 64)
	total, err3 := strconv.ParseInt(tot, 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || start < 0 || end < start || end >= total {
		return 0, 0, 0, false
	}
	return start, end, total, true
}

// spoolEnd is the end of the spool's bytes a reader may read up to avail (readable's
// answer): a pass-through fill's later bytes are in its window, not its spool.
// f.mu must be held.
func (f *Fill) spoolEnd(avail int64) int64 {
	if f.par != nil {
		return avail
	}
	return f.spooled
}
