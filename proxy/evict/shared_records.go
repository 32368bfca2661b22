package evict

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
)

// The records of shared eviction, JSON under evict/ in the bucket (shared.go).

const (
	seenPrefix   = "evict/seen/"
	doomedPrefix = "evict/doomed/"
	usageKey     = "evict/usage"
	leaderKey    = "evict"
	sharedFormat = 1
)

// seenRecord is a replica's report (evict/seen/<member>).
type seenRecord struct {
	Version  int               `json:"version"`
	Member   string            `json:"member"`
	Seq      uint64            `json:"seq"`
	Closed   bool              `json:"closed,omitempty"` // the replica stopped: not waited for
	Acks     map[string]uint64 `json:"acks,omitempty"`   // doomed writer -> the seq installed
	Open     []digest.Digest   `json:"open,omitempty"`
	Reserved int64             `json:"reserved"`         // every reservation, granted ones included
	Grants   []seenGrant       `json:"grants,omitempty"` // reservations a leader granted, still held
	Touched  []seenBlob        `json:"touched,omitempty"`
	Records  []seenKey         `json:"records,omitempty"`
}

// seenBlob is a blob stored (Stored) or read by the reporting replica; Ts orders the
// reporter's events, so the leader merges each once (usageRecord.Merged).
type seenBlob struct {
	Digest digest.Digest `json:"d"`
	Size   int64         `json:"s"`
	Atime  int64         `json:"a"`
	Stored bool          `json:"stored,omitempty"`
	Ts     uint64        `json:"t"`
}

// seenGrant is a reservation the reporting replica holds on a leader's grant (or is
// asking it for): the leader that granted it drops a grant a later record no longer lists.
type seenGrant struct {
	Seq    uint64 `json:"q"`
	Leader string `json:"l"`
	Cost   int64  `json:"c"`
}

type seenKey struct {
	Key    string        `json:"k"`
	Digest digest.Digest `json:"d"`
	Ts     uint64        `json:"t"`
}

// doomedRecord is a leader's list of blobs being evicted (evict/doomed/<member>).
type doomedRecord struct {
	Version int             `json:"version"`
	Member  string          `json:"member"`
	Seq     uint64          `json:"seq"`
	Doomed  []digest.Digest `json:"doomed"`
}

// usageRecord is the leader's account of the bucket (evict/usage).
type usageRecord struct {
	Version  int               `json:"version"`
	Leader   string            `json:"leader"`
	Stored   int64             `json:"stored"` // blobs, records and the index
	Pinned   int64             `json:"pinned"`
	Blobs    int               `json:"blobs"`
	Reserved map[string]int64  `json:"reserved,omitempty"` // live replica -> reserved bytes
	Merged   map[string]uint64 `json:"merged,omitempty"`   // replica -> last Ts merged
}

// memberKey is a member's record name: a hash, as URLs do not make record keys.
func memberKey(prefix, member string) string {
	h := sha256.Sum256([]byte(member))
	return prefix + hex.EncodeToString(h[:16])
}

func (s *Store) putJSON(ctx context.Context, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return s.inner.PutRecord(ctx, key, b)
}

func (s *Store) getJSON(ctx context.Context, key string, v any) error {
	b, err := s.inner.GetRecord(ctx, key)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%w: %s: %v", errdefs.ErrDataLoss, key, err)
	}
	return nil
}

// sharedUsed is what the bucket holds now, as a reservation must count it: the
// leader's account, plus what every other replica that has not stopped reserved and
// stored since the leader merged its record (read fresh from the bucket), plus this
// replica's own stores the leader has not merged; this replica's reservations are
// not included, nor, on the leader, its grants (the records' grants are listed by member:
// the leader counts those it holds once, see grantsCountedLocked).
func (s *Store) sharedUsed(ctx context.Context) (int64, map[string][]seenGrant, error) {
	sh := s.sh
	s.mu.Lock()
	leader := sh.leader
	base := s.stored + s.indexBytes
	merged := map[string]uint64{}
	for m, ts := range sh.mergedSnap {
		merged[m] = ts
	}
	stale := sh.stale
	s.mu.Unlock()
	if !leader {
		var u usageRecord
		if err := s.getJSON(ctx, usageKey, &u); err != nil && !errdefs.IsNotFound(err) {
			return 0, nil, err
		}
		base, merged = u.Stored, u.Merged
	}
	var keys []string
	if err := s.inner.ListRecords(ctx, seenPrefix, func(k string) error { keys = append(keys, k); return nil }); err != nil {
		return 0, nil, err
	}
	used := base
	listed := map[string][]seenGrant{}
	for _, k := range keys {
		if k == memberKey(seenPrefix, sh.cfg.Self) {
			continue
		}
		var rec seenRecord
		if err := s.getJSON(ctx, k, &rec); errdefs.IsNotFound(err) {
			continue
		} else if err != nil {
			return 0, nil, err
		}
		if rec.Closed || stale[rec.Member] {
			continue
		}
		used += rec.Reserved + unmergedCost(rec.Touched, merged[rec.Member])
		listed[rec.Member] = rec.Grants
	}
	if !leader {
		s.mu.Lock()
		for _, t := range sh.touched {
			if t.stored && t.ts > merged[sh.cfg.Self] {
				used += blobCost(t.size) + recordCost
			}
		}
		s.mu.Unlock()
	}
	return used, listed, nil
}

// unmergedCost is what the blobs a replica stored after the leader's last merge of its
// record cost.
func unmergedCost(touched []seenBlob, merged uint64) int64 {
	var n int64
	for _, t := range touched {
		if t.Stored && t.Ts > merged {
			n += blobCost(t.Size) + recordCost
		}
	}
	return n
}
