package cluster

import (
	"slices"
	"strings"

	"github.com/cespare/xxhash/v2"
)

// Rendezvous (highest random weight) hashing: every member scores every key, and the
// key's owner is the member with the highest score. Replicas that see the same members
// agree on every owner without talking to each other, and a member that joins or leaves
// moves only the keys it wins or won (about 1/N of them): a consistent-hash ring needs
// virtual nodes for the same balance, and N is small here (a handful of replicas), so
// scoring every member per request costs nothing worth measuring (docs/scaleout.md).

// score is member's weight for key: xxhash64 of both, with a separator so that
// ("a", "bc") and ("ab", "c") differ, and a final mix so that members whose names differ
// by a character do not score keys alike.
func score(member, key string) uint64 {
	d := xxhash.New()
	_, _ = d.WriteString(member)
	_, _ = d.WriteString("\x00")
	_, _ = d.WriteString(key)
	return mix(d.Sum64())
}

// mix is the splitmix64 finalizer.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// Owner returns key's owner among members: the member with the highest score ("" when
// there is none). Ties, which need two equal 64-bit scores, go to the smaller name.
func Owner(members []string, key string) string {
	best, bestScore := "", uint64(0)
	for _, m := range members {
		s := score(m, key)
		if best == "" || s > bestScore || s == bestScore && m < best {
			best, bestScore = m, s
		}
	}
	return best
}

// Rank returns members ordered by their score for key, owner first: when the owner is
// down, the next in rank takes over, and every replica agrees on who that is.
func Rank(members []string, key string) []string {
	type scored struct {
		member string
		score  uint64
	}
	all := make([]scored, 0, len(members))
	for _, m := range members {
		all = append(all, scored{m, score(m, key)})
	}
	slices.SortFunc(all, func(a, b scored) int {
		switch {
		case a.score > b.score:
			return -1
		case a.score < b.score:
			return 1
		}
		return strings.Compare(a.member, b.member)
	})
	out := make([]string, len(all))
	for i, s := range all {
		out[i] = s.member
	}
	return out
}
