package fill

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// spans against a bitmap: any order of adds gives the same merged set, and end and
// next answer as the bitmap does.
func TestSegmentSpansMatchBitmap(t *testing.T) {
	const size = 200
	rng := rand.New(rand.NewPCG(1, 2))
	for round := 0; round < 200; round++ {
		var s spans
		bits := make([]bool, size)
		for range rng.IntN(12) {
			lo := rng.Int64N(size)
			hi := lo + rng.Int64N(size-lo+1)
			s = s.add(lo, hi)
			for i := lo; i < hi; i++ {
				bits[i] = true
			}
		}
		for i := 1; i < len(s); i++ {
			if s[i].lo <= s[i-1].hi || s[i].lo >= s[i].hi {
				t.Fatalf("spans not sorted, disjoint and merged: %v", s)
			}
		}
		for off := int64(0); off < size; off++ {
			want := off
			for want < size && bits[want] {
				want++
			}
			if got := s.end(off); got != want && bits[off] {
				t.Fatalf("%v: end(%d) = %d, want %d", s, off, got, want)
			} else if !bits[off] && got != off {
				t.Fatalf("%v: end(%d) = %d for a byte not held", s, off, got)
			}
			if !bits[off] {
				next := off + 1
				for next < size && !bits[next] {
					next++
				}
				if got := s.next(off, size); got != next {
					t.Fatalf("%v: next(%d) = %d, want %d", s, off, got, next)
				}
			}
		}
	}
}

func TestSegmentSpansAddMerges(t *testing.T) {
	var s spans
	s = s.add(10, 20)
	s = s.add(30, 40)
	s = s.add(0, 5)
	s = s.add(20, 30) // bridges two
	s = s.add(7, 7)   // empty: nothing
	if want := (spans{{0, 5}, {10, 40}}); !slices.Equal(s, want) {
		t.Fatalf("spans %v, want %v", s, want)
	}
}

func TestSegmentContentRangeParse(t *testing.T) {
	for _, tc := range []struct {
		v                 string
		start, end, total int64
		ok                bool
	}{
		{"bytes 0-99/1000", 0, 99, 1000, true},
		{"bytes 100-199/1000", 100, 199, 1000, true},
		{"bytes 900-999/1000", 900, 999, 1000, true},
		{"bytes 900-1000/1000", 0, 0, 0, false}, // past the end
		{"bytes 200-100/1000", 0, 0, 0, false},
		{"bytes 0-99/*", 0, 0, 0, false},
		{"bytes */1000", 0, 0, 0, false},
		{"items 0-99/1000", 0, 0, 0, false},
		{"bytes -1-99/1000", 0, 0, 0, false},
	} {
		s, e, total, ok := parseContentRangeSpan(tc.v)
		if ok != tc.ok || ok && (s != tc.start || e != tc.end || total != tc.total) {
			t.Errorf("parseContentRangeSpan(%q) = %d, %d, %d, %v", tc.v, s, e, total, ok)
		}
	}
}
