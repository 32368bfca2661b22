package httpx

import (
	"errors"
	"testing"
)

func TestParseRange(t *testing.T) {
	tests := []struct {
		header  string
		size    int64
		want    ByteRange
		partial bool
		err     error
	}{
		{"", 100, ByteRange{}, false, nil},
		{"bytes=0-", 100, ByteRange{0, 99}, true, nil},
		{"bytes=10-19", 100, ByteRange{10, 19}, true, nil},
		{"bytes=10-1000", 100, ByteRange{10, 99}, true, nil},
		{"bytes=99-", 100, ByteRange{99, 99}, true, nil},
		{"bytes=-10", 100, ByteRange{90, 99}, true, nil},
		{"bytes=-1000", 100, ByteRange{0, 99}, true, nil},
		{"bytes= 5 - 9 ", 100, ByteRange{5, 9}, true, nil},
		{"bytes=100-", 100, ByteRange{}, false, ErrRangeUnsatisfiable},
		{"bytes=-0", 100, ByteRange{}, false, ErrRangeUnsatisfiable},
		{"bytes=0-", 0, ByteRange{}, false, ErrRangeUnsatisfiable},
		{"bytes=5-4", 100, ByteRange{}, false, ErrRangeUnsatisfiable},
		{"bytes=500-0", 100, ByteRange{}, false, ErrRangeUnsatisfiable},
		{"bytes=500-0", -1, ByteRange{}, false, ErrRangeUnsatisfiable},
		{"bytes=a-b", 100, ByteRange{}, false, ErrRangeMalformed},
		{"bytes=-", 100, ByteRange{}, false, ErrRangeMalformed},
		{"bytes=+5-", 100, ByteRange{}, false, ErrRangeMalformed},
		{"bytes=5", 100, ByteRange{}, false, ErrRangeMalformed},
		{"items=0-5", 100, ByteRange{}, false, ErrRangeMalformed},
		{"bytes=99999999999999999999-", 100, ByteRange{}, false, ErrRangeMalformed},
		{"bytes=0-1,5-6", 100, ByteRange{}, false, ErrRangeMultiple},
		// Unknown size: open ranges stay open; suffixes cannot be resolved.
		{"bytes=10-", -1, ByteRange{10, -1}, true, nil},
		{"bytes=10-20", -1, ByteRange{10, 20}, true, nil},
		{"bytes=-10", -1, ByteRange{}, false, ErrRangeUnsatisfiable},
	}
	for _, tt := range tests {
		got, partial, err := ParseRange(tt.header, tt.size)
		if !errors.Is(err, tt.err) || (err == nil && (got != tt.want || partial != tt.partial)) {
			t.Errorf("ParseRange(%q, %d) = %+v, %v, %v; want %+v, %v, %v", tt.header, tt.size, got, partial, err, tt.want, tt.partial, tt.err)
		}
	}
	if got := (ByteRange{10, 19}).ContentRange(100); got != "bytes 10-19/100" {
		t.Fatal(got)
	}
}

// FuzzParseRange: an accepted range always lies inside the body.
func FuzzParseRange(f *testing.F) {
	for _, s := range []string{"bytes=0-", "bytes=1-2", "bytes=-5", "bytes=0-1,2-3", "bytes=x", ""} {
		f.Add(s, int64(100))
	}
	f.Fuzz(func(t *testing.T, header string, size int64) {
		if size < 0 {
			size = -size
		}
		r, partial, err := ParseRange(header, size)
		if err != nil || !partial {
			return
		}
		if r.Start < 0 || r.End < r.Start || r.End >= size || r.Length() <= 0 {
			t.Fatalf("ParseRange(%q, %d) = %+v outside the body", header, size, r)
		}
	})
}
