package evict

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/storage"
)

// The index: every blob's size, access time and records, and the records waiting for a
// blob, as gzipped JSON in one record (IndexKey). It is written every Interval when it
// changed, marked unclean, and at Close, marked clean. At start a clean index is trusted
// as it is; an unclean one (the process died) is used for access times while a walk in
// the background adds what it missed; a missing or unreadable one is rebuilt by a walk.
type indexFile struct {
	Version int            `json:"version"`
	Clean   bool           `json:"clean"`
	Written time.Time      `json:"written"`
	Swept   bool           `json:"swept,omitempty"` // legacy records removed
	Blobs   []indexBlob    `json:"blobs"`
	Pending []indexPending `json:"pending,omitempty"`
}

type indexBlob struct {
	Digest  digest.Digest `json:"d"`
	Size    int64         `json:"s"`
	Atime   int64         `json:"a"` // unix nanoseconds
	Records []string      `json:"r,omitempty"`
}

type indexPending struct {
	Digest  digest.Digest `json:"d"`
	Since   int64         `json:"t"`
	Records []string      `json:"r"`
}

const indexVersion = 1

// loadIndex reads the index into memory, and reports whether the store must be walked.
func (s *Store) loadIndex(ctx context.Context) (walk bool) {
	start := s.now()
	b, err := s.inner.GetRecord(ctx, IndexKey)
	if err != nil {
		if !errdefs.IsNotFound(err) {
			s.m.Errors.WithLabelValues("index").Inc()
		}
		s.log.Info("no eviction index: rebuilding it by walking the store in the background", "error", err)
		return true
	}
	idx, err := decodeIndex(b)
	if err != nil {
		s.m.Errors.WithLabelValues("index").Inc()
		s.log.Warn("eviction index unreadable: rebuilding it by walking the store in the background", "error", err)
		return true
	}
	s.mu.Lock()
	for _, ib := range idx.Blobs {
		if ib.Digest.Validate() != nil || ib.Size < 0 {
			continue
		}
		// A leader taking over already knows some blobs: merge, the latest access wins.
		e := s.blobs[ib.Digest]
		if e == nil {
			e = &entry{size: ib.Size, records: map[string]struct{}{}}
			s.blobs[ib.Digest] = e
			s.stored += e.cost()
		}
		e.atime = max(e.atime, ib.Atime)
		for _, k := range ib.Records {
			if _, ok := e.records[k]; !ok {
				e.records[k] = struct{}{}
				s.stored += recordCost
			}
			s.owner[k] = ib.Digest
		}
	}
	for _, ip := range idx.Pending {
		p := &pending{keys: map[string]struct{}{}, since: ip.Since}
		for _, k := range ip.Records {
			p.keys[k] = struct{}{}
			s.owner[k] = ip.Digest
		}
		s.pending[ip.Digest] = p
	}
	s.swept = idx.Swept
	s.indexBytes = blobCost(int64(len(b)))
	n := len(s.blobs)
	s.gaugesLocked()
	s.mu.Unlock()
	s.log.Info("eviction index loaded", "blobs", n, "bytes", s.Used(), "clean", idx.Clean,
		"written", idx.Written, "blobs_walked", 0, "took", s.now().Sub(start).String())
	if err := s.writeIndex(ctx, false); err != nil {
		// The clean mark stays: a crash before the next write would be trusted. Walk.
		s.log.Warn("marking the eviction index in use failed", "error", err)
		return true
	}
	return !idx.Clean
}

func decodeIndex(b []byte) (*indexFile, error) {
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	var idx indexFile
	if err := json.NewDecoder(io.LimitReader(zr, 1<<30)).Decode(&idx); err != nil {
		return nil, err
	}
	if idx.Version != indexVersion {
		return nil, fmt.Errorf("index version %d, want %d", idx.Version, indexVersion)
	}
	return &idx, nil
}

// writeIndex persists the accounting (atomically: PutRecord).
func (s *Store) writeIndex(ctx context.Context, clean bool) error {
	s.indexMu.Lock() // writes land in the order of their snapshots
	defer s.indexMu.Unlock()
	s.mu.Lock()
	idx := indexFile{Version: indexVersion, Clean: clean, Written: s.now().UTC(), Swept: s.swept,
		Blobs: make([]indexBlob, 0, len(s.blobs))}
	for d, e := range s.blobs {
		idx.Blobs = append(idx.Blobs, indexBlob{Digest: d, Size: e.size, Atime: e.atime, Records: keysOf(e.records)})
	}
	for d, p := range s.pending {
		idx.Pending = append(idx.Pending, indexPending{Digest: d, Since: p.since, Records: keysOf(p.keys)})
	}
	s.dirty = false
	s.mu.Unlock()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if err := json.NewEncoder(zw).Encode(&idx); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	if err := s.inner.PutRecord(ctx, IndexKey, buf.Bytes()); err != nil {
		s.m.Errors.WithLabelValues("index").Inc()
		s.mu.Lock()
		s.dirty = true
		s.mu.Unlock()
		return err
	}
	s.mu.Lock()
	s.indexBytes = blobCost(int64(buf.Len()))
	s.gaugesLocked()
	s.mu.Unlock()
	return nil
}

// reconcile walks the store: blobs the index missed are added (accessed now, as far as
// cove knows), entries whose blob is gone are dropped. Then the records are swept.
func (s *Store) reconcile(ctx context.Context) {
	start := s.now()
	seen := map[digest.Digest]struct{}{}
	added := 0
	err := s.inner.Walk(ctx, func(bi storage.BlobInfo) error {
		s.m.WalkedBlobs.Inc()
		seen[bi.Digest] = struct{}{}
		s.mu.Lock()
		_, known := s.blobs[bi.Digest]
		_, gone := s.deleting[bi.Digest]
		s.mu.Unlock()
		if !known && !gone {
			s.added(bi.Digest, bi.Size, addStored)
			added++
		}
		return nil
	})
	if err != nil {
		if ctx.Err() == nil {
			s.m.Errors.WithLabelValues("walk").Inc()
			s.log.Warn("walking the store failed", "error", err)
		}
		return
	}
	dropped := 0
	s.mu.Lock()
	for d, e := range s.blobs {
		if _, ok := seen[d]; !ok && e.refs == 0 && e.atime < start.UnixNano() {
			delete(s.blobs, d)
			for k := range e.records {
				delete(s.owner, k)
			}
			s.stored -= e.cost()
			dropped++
		}
	}
	s.dirty = true
	s.gaugesLocked()
	s.mu.Unlock()
	s.log.Info("store walked", "blobs_walked", len(seen), "added", added, "dropped", dropped, "took", s.now().Sub(start).String())
	s.sweep(ctx, ownedPrefixes, "orphan")
	s.sweep(ctx, legacyPrefixes, "legacy")
	s.kickEvict()
}

func (s *Store) sweptLegacy() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.swept
}

// sweep lists the records under prefixes: a record whose blob is stored is attached to
// it; one cove already knows is left; any other is removed (an orphan of a crash, or a
// legacy format).
func (s *Store) sweep(ctx context.Context, prefixes []string, reason string) {
	var orphans []string
	for _, prefix := range prefixes {
		err := s.inner.ListRecords(ctx, prefix, func(key string) error {
			s.mu.Lock()
			_, known := s.owner[key]
			s.mu.Unlock()
			if known {
				return nil
			}
			if reason == "legacy" {
				orphans = append(orphans, key)
				return nil
			}
			var value []byte
			if prefix == "tag/" {
				value, _ = s.inner.GetRecord(ctx, key)
			}
			d, ok := recordDigest(key, value)
			if !ok {
				orphans = append(orphans, key)
				return nil
			}
			s.mu.Lock()
			_, stored := s.blobs[d]
			s.mu.Unlock()
			if !stored && s.sh != nil {
				// Another replica may have stored it since the walk and not reported it yet.
				if _, err := s.inner.Stat(ctx, d); err == nil {
					return nil
				}
			}
			if stored {
				s.attach(key, d)
				if s.pins.matches(key) {
					s.pins.setRoot(key, d)
				}
			} else {
				orphans = append(orphans, key)
			}
			return nil
		})
		if err != nil {
			if ctx.Err() == nil {
				s.m.Errors.WithLabelValues("sweep").Inc()
				s.log.Warn("sweeping records failed", "prefix", prefix, "error", err)
			}
			return
		}
	}
	// A record written since the listing is known by now: never remove it.
	s.mu.Lock()
	keep := orphans[:0]
	for _, k := range orphans {
		if _, known := s.owner[k]; !known {
			keep = append(keep, k)
		}
	}
	s.mu.Unlock()
	s.deleteRecords(ctx, keep)
	s.m.RecordsCollected.WithLabelValues(reason).Add(float64(len(keep)))
	if reason == "legacy" {
		s.mu.Lock()
		s.swept = true
		s.dirty = true
		s.mu.Unlock()
	}
	if len(keep) > 0 {
		s.log.Info("records removed", "reason", reason, "records", len(keep))
	}
	s.kickPins()
}
