package evict

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"syscall"
)

var units = []struct {
	suffix string
	mult   float64
}{
	{"PiB", 1 << 50}, {"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1},
}

// ParseSize reads a size in bytes with an optional binary unit: "500GiB", "100MiB",
// "1.5TiB", "4096" or "4096B". Decimal units (GB, MB) are refused rather than guessed.
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	mult := 1.0
	for _, u := range units {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, fmt.Errorf("size %q: want a number of bytes with an optional binary unit (KiB, MiB, GiB, TiB, PiB), like 500GiB", s)
	}
	b := v * mult
	if b >= math.MaxInt64 {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return int64(b), nil
}

// MinFree is the free-space trigger: a number of bytes or a percent of the filesystem.
type MinFree struct {
	Bytes   int64
	Percent float64
}

// ParseMinFree reads "20GiB" or "10%".
func ParseMinFree(s string) (MinFree, error) {
	t := strings.TrimSpace(s)
	if p, ok := strings.CutSuffix(t, "%"); ok {
		v, err := strconv.ParseFloat(strings.TrimSpace(p), 64)
		if err != nil || v < 0 || v >= 100 {
			return MinFree{}, fmt.Errorf("min free %q: want a percent in [0, 100) or a size like 20GiB", s)
		}
		return MinFree{Percent: v}, nil
	}
	b, err := ParseSize(t)
	if err != nil {
		return MinFree{}, err
	}
	return MinFree{Bytes: b}, nil
}

// IsZero reports whether no free-space trigger is set.
func (m MinFree) IsZero() bool { return m.Bytes == 0 && m.Percent == 0 }

// want is the free space wanted on a filesystem of total bytes.
func (m MinFree) want(total uint64) int64 {
	if m.Percent > 0 {
		return int64(float64(total) * m.Percent / 100)
	}
	return m.Bytes
}

// FilesystemFree reports the free space (for an unprivileged writer) and size of the
// filesystem holding dir: the Free function for a filesystem store.
func FilesystemFree(dir string) func() (free, total uint64, err error) {
	return func() (uint64, uint64, error) {
		var st syscall.Statfs_t
		if err := syscall.Statfs(dir, &st); err != nil {
			return 0, 0, err
		}
		bs := uint64(st.Bsize)
		return st.Bavail * bs, st.Blocks * bs, nil
	}
}
