// Package httpx holds cove's small HTTP helpers: byte ranges, distribution-format errors
// and the header rules for talking to origins.
package httpx

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ByteRange is one satisfiable range [Start, End] inclusive, as in Content-Range.
type ByteRange struct {
	Start, End int64
}

// Length is the number of bytes in the range.
func (r ByteRange) Length() int64 { return r.End - r.Start + 1 }

// ContentRange is the Content-Range header value for this range of a body of size bytes.
func (r ByteRange) ContentRange(size int64) string {
	return fmt.Sprintf("bytes %d-%d/%d", r.Start, r.End, size)
}

// Errors from ParseRange. ErrRangeMalformed is a client error (400);
// ErrRangeUnsatisfiable is answered with 416 and Content-Range: bytes */size.
var (
	ErrRangeMalformed     = errors.New("malformed Range header")
	ErrRangeUnsatisfiable = errors.New("range not satisfiable")
	ErrRangeMultiple      = errors.New("multiple ranges are not supported")
)

const maxRangeHeader = 256

// ParseRange parses a Range header for a body of size bytes (size < 0: not known yet).
//
// It accepts exactly one range of unit bytes: "bytes=N-", "bytes=N-M" or "bytes=-N"
// (the last N bytes). An empty header returns ok=false: serve the whole body. Several
// ranges return ErrRangeMultiple, which callers answer with the whole body, as RFC 9110
// allows: registries' clients (containerd) only ever ask for one.
//
// With an unknown size, a suffix range cannot be resolved and an open range gets
// End = -1; the caller resolves it once the size is known.
func ParseRange(header string, size int64) (r ByteRange, ok bool, err error) {
	if header == "" {
		return ByteRange{}, false, nil
	}
	if len(header) > maxRangeHeader {
		return ByteRange{}, false, ErrRangeMalformed
	}
	spec, found := strings.CutPrefix(header, "bytes=")
	if !found {
		return ByteRange{}, false, ErrRangeMalformed
	}
	spec = strings.TrimSpace(spec)
	if strings.Contains(spec, ",") {
		return ByteRange{}, false, ErrRangeMultiple
	}
	first, last, found := strings.Cut(spec, "-")
	if !found {
		return ByteRange{}, false, ErrRangeMalformed
	}
	first, last = strings.TrimSpace(first), strings.TrimSpace(last)
	switch {
	case first == "" && last == "":
		return ByteRange{}, false, ErrRangeMalformed
	case first == "":
		// Suffix range: the last n bytes.
		n, err := parseOffset(last)
		if err != nil {
			return ByteRange{}, false, err
		}
		if size < 0 {
			return ByteRange{}, false, ErrRangeUnsatisfiable
		}
		if n == 0 || size == 0 {
			return ByteRange{}, false, ErrRangeUnsatisfiable
		}
		if n > size {
			n = size
		}
		return ByteRange{Start: size - n, End: size - 1}, true, nil
	}
	start, err := parseOffset(first)
	if err != nil {
		return ByteRange{}, false, err
	}
	end := int64(-1)
	if last != "" {
		if end, err = parseOffset(last); err != nil {
			return ByteRange{}, false, err
		}
		if end < start {
			// RFC 9110 would let a server ignore such a range; the distribution spec's
			// conformance suite wants 416 for it (bytes=500-0), as distribution answers.
			return ByteRange{}, false, ErrRangeUnsatisfiable
		}
	}
	if size >= 0 {
		if start >= size {
			return ByteRange{}, false, ErrRangeUnsatisfiable
		}
		if end < 0 || end >= size {
			end = size - 1
		}
	}
	return ByteRange{Start: start, End: end}, true, nil
}

func parseOffset(s string) (int64, error) {
	if s == "" || len(s) > 19 {
		return 0, ErrRangeMalformed
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, ErrRangeMalformed
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, ErrRangeMalformed
	}
	return n, nil
}
