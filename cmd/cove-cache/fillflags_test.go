package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParallelFillFlagsDefaults(t *testing.T) {
	o, err := parseServe(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.fill.parallel != 4 || o.fill.rangeBytes != 16<<20 || o.fill.minBytes != 64<<20 {
		t.Fatalf("defaults %+v", o.fill)
	}
}

func TestParallelFillFlagsSet(t *testing.T) {
	o, err := parseServe([]string{"--fill-parallel", "8", "--fill-range-size", "4MiB", "--fill-parallel-min", "1GiB"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.fill.parallel != 8 || o.fill.rangeBytes != 4<<20 || o.fill.minBytes != 1<<30 {
		t.Fatalf("flags %+v", o.fill)
	}
	// The same keys in a configuration file.
	p := filepath.Join(t.TempDir(), "cove.toml")
	if err := os.WriteFile(p, []byte("fill_parallel = 2\nfill_range_size = \"1MiB\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if o, err = parseServe([]string{"--config", p}, io.Discard); err != nil {
		t.Fatal(err)
	}
	if o.fill.parallel != 2 || o.fill.rangeBytes != 1<<20 {
		t.Fatalf("from file %+v", o.fill)
	}
}

func TestParallelFillFlagsBad(t *testing.T) {
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--fill-parallel", "0"}, "--fill-parallel 0"},
		{[]string{"--fill-parallel", "33"}, "--fill-parallel 33"},
		{[]string{"--fill-range-size", "1KiB"}, "at least 64KiB"},
		{[]string{"--fill-range-size", "lots"}, "--fill-range-size"},
		{[]string{"--fill-parallel-min", "-1"}, "--fill-parallel-min"},
	} {
		if _, err := parseServe(tt.args, io.Discard); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%v: err %v, want one naming %q", tt.args, err, tt.want)
		}
	}
}
