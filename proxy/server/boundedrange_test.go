package server

import "testing"

func TestParallelBoundedRange(t *testing.T) {
	for h, want := range map[string]bool{
		"bytes=0-99":    true,
		"bytes=100-199": true,
		"bytes=-51":     true, // a suffix: the last 51 bytes (a stargz footer)
		"bytes=100-":    false,
		"bytes=0-":      false,
		" bytes=5- ":    false,
	} {
		if got := boundedRange(h); got != want {
			t.Errorf("boundedRange(%q) = %v, want %v", h, got, want)
		}
	}
}
