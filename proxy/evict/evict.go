package evict

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/fill"
)

// Triggers of an eviction (the metrics' label).
const (
	triggerMaxSize = "max-size"
	triggerMinFree = "min-free"
)

// used is what counts against MaxSize; s.mu must be held.
func (s *Store) usedLocked() int64 {
	if s.sh != nil {
		if !s.sh.leader {
			return s.followerUsedLocked()
		}
		return s.stored + s.unlinking + s.reserved + s.sh.othersReserved + s.indexBytes + s.sh.grantedCost - s.grantsCountedLocked(s.sh.listed)
	}
	return s.stored + s.unlinking + s.reserved + s.indexBytes
}

// Used returns the bytes counted against the bound: stored, being deleted, reserved and
// the index.
func (s *Store) Used() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.usedLocked()
}

// Reserve is a fill.ReserveFunc: it counts size bytes against the bound before a fill
// spools them, evicting first when they do not fit. A fill that cannot fit even after
// eviction is refused (the fill then serves its clients without storing the blob).
// A size the origin did not announce (< 0) reserves nothing: the blob is counted when
// stored, and the background evictor makes room after it.
func (s *Store) Reserve(ctx context.Context, key fill.Key, size int64) (func(stored bool), error) {
	if size < 0 {
		size = 0
	}
	cost := blobCost(size) + recordCost
	max := s.cfg.MaxSize
	if max > 0 && cost > max {
		s.m.ReserveRefused.Inc()
		return nil, fmt.Errorf("%w: %w: blob %s of %d bytes, store of %d bytes", fill.ErrLargerThanStore, errdefs.ErrResourceExhausted, key.Digest, size, max)
	}
	var current int64 = -1 // shared: what the bucket and every replica hold right now
	var listed map[string][]seenGrant
	if s.sh != nil && max > 0 {
		if release, err, decided := s.reserveAtLeader(ctx, key, size, cost); decided {
			return release, err
		}
		var err error
		if current, listed, err = s.sharedUsed(ctx); err != nil {
			s.m.ReserveRefused.Inc()
			return nil, fmt.Errorf("%w: no room for blob %s: the replicas' usage is unreadable: %w", errdefs.ErrResourceExhausted, key.Digest, err)
		}
	}
	for attempt := 0; ; attempt++ {
		s.mu.Lock()
		used := s.usedLocked()
		if current >= 0 {
			used = current + s.reserved
			if s.sh.leader { // and what it granted, which the records read may count already
				used += s.sh.grantedCost - s.grantsCountedLocked(listed)
			}
		}
		over := used + cost - max
		if max == 0 || over <= 0 {
			r := &reservation{cost: cost}
			s.reserved += cost
			s.resv[key.Digest] = append(s.resv[key.Digest], r)
			s.gaugesLocked()
			s.mu.Unlock()
			s.kickEvict() // past the high watermark: make room ahead of the next fill
			s.kickSync()  // the other replicas count it from the next record
			return func(stored bool) {
				s.mu.Lock()
				s.endReservationLocked(key.Digest, r, stored)
				s.gaugesLocked()
				s.mu.Unlock()
			}, nil
		}
		if s.sh != nil {
			// Shared eviction frees room in rounds (two phases), never within a fill's
			// request: this fill passes through, and the leader makes room ahead of the next.
			s.wantRoomLocked(over)
			s.mu.Unlock()
			s.kickEvict()
			s.m.ReserveRefused.Inc()
			return nil, fmt.Errorf("%w: no room for blob %s (%d bytes) until the eviction leader frees some", errdefs.ErrResourceExhausted, key.Digest, size)
		}
		s.mu.Unlock()
		if attempt < 2 {
			if freed, fits := s.evictFor(ctx, cost); fits || freed > 0 {
				continue // count again: others may have reserved what was freed
			}
		}
		s.m.ReserveRefused.Inc()
		return nil, fmt.Errorf("%w: no room for blob %s (%d bytes): the rest of the store is pinned, being read or reserved", errdefs.ErrResourceExhausted, key.Digest, size)
	}
}

// reservation is room held for one fill until its blob is stored or the fill ends.
type reservation struct {
	cost  int64
	ended bool
	// On a leader's grant (shared_grants.go): the leader and the grant's seq.
	leader string
	seq    uint64
	size   int64
}

// endReservationLocked gives a reservation's room back, once, and a grant back to the
// leader that made it (stored: the blob is in the store now); s.mu must be held.
func (s *Store) endReservationLocked(d digest.Digest, r *reservation, stored bool) {
	if r.ended {
		return
	}
	r.ended = true
	if r.leader != "" && s.link != nil {
		go s.returnGrant(s.link, r.leader, r.seq, d, stored, r.size)
	}
	s.reserved -= r.cost
	list := s.resv[d]
	for i, x := range list {
		if x == r {
			list = append(list[:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(s.resv, d)
	} else {
		s.resv[d] = list
	}
}

// makeRoom evicts before a Put that would pass the bound (manifests, which are small and
// stored without a reservation).
func (s *Store) makeRoom(ctx context.Context, size int64) {
	if s.cfg.MaxSize == 0 || s.sh != nil {
		return
	}
	s.evictFor(ctx, blobCost(size)+recordCost)
}

// evictFor evicts what cost bytes more would pass the bound by (not shared). The excess
// is counted under evictMu: an eviction that ran meanwhile may have freed it already.
func (s *Store) evictFor(ctx context.Context, cost int64) (freed int64, fits bool) {
	s.evictMu.Lock()
	defer s.evictMu.Unlock()
	s.mu.Lock()
	over := s.usedLocked() + cost - s.cfg.MaxSize
	s.mu.Unlock()
	if over <= 0 {
		return 0, true
	}
	return s.evictBytes(ctx, over, triggerMaxSize), false
}

// evictBytes evicts least recently used blobs until need bytes are freed or nothing more
// can go (pinned, being read). It returns the bytes freed.
func (s *Store) evictBytes(ctx context.Context, need int64, trigger string) int64 {
	type cand struct {
		d     digest.Digest
		atime int64
	}
	s.resolvePinsIfDirty(ctx)
	s.mu.Lock()
	cands := make([]cand, 0, len(s.blobs))
	for d, e := range s.blobs {
		if _, pin := s.pinned[d]; pin || e.refs > 0 {
			continue
		}
		if s.sh != nil {
			_, doomed := s.sh.doomed[d]
			_, elsewhere := s.sh.openElsewhere[d]
			if doomed || elsewhere {
				continue
			}
		}
		cands = append(cands, cand{d, e.atime})
	}
	s.mu.Unlock()
	sort.Slice(cands, func(i, j int) bool { return cands[i].atime < cands[j].atime })
	var freed int64
	for _, c := range cands {
		if freed >= need || ctx.Err() != nil {
			break
		}
		freed += s.evictOne(ctx, c.d, c.atime, trigger)
	}
	return freed
}

// evictOne removes one blob: its records first (so it is never served without them),
// then the blob. Stat and Open answer not found from the moment it is chosen. A blob
// used since the candidates were listed (atime changed; anyAtime: no check) stays: the
// server's Stat before an Open is such a use, so a blob about to be read is kept.
func (s *Store) evictOne(ctx context.Context, d digest.Digest, atime int64, trigger string) int64 {
	if s.sh != nil {
		return s.doom(d, atime)
	}
	return s.removeBlob(ctx, d, atime, trigger)
}

// removeBlob deletes one blob now, records first. Its bytes count against the bound
// (unlinking) until they are deleted: a fill that reserved them before would spool on a
// disk that still holds them, past the bound (make test saw 67 MiB in a 64 MiB tmpfs).
func (s *Store) removeBlob(ctx context.Context, d digest.Digest, atime int64, trigger string) int64 {
	s.mu.Lock()
	e := s.blobs[d]
	_, pin := s.pinned[d]
	if e == nil || e.refs > 0 || pin || (atime != anyAtime && e.atime != atime) {
		s.mu.Unlock()
		return 0
	}
	delete(s.blobs, d)
	cost := e.cost()
	s.deleting[d] = struct{}{}
	s.stored -= cost
	s.unlinking += cost
	for k := range e.records {
		delete(s.owner, k)
	}
	s.dirty = true
	s.gaugesLocked()
	s.mu.Unlock()

	s.deleteRecords(ctx, keysOf(e.records))
	err := s.inner.Delete(ctx, d)
	s.mu.Lock()
	delete(s.deleting, d)
	s.unlinking -= cost
	if err != nil && !errdefs.IsNotFound(err) {
		// Still there, but without its records: not served; account it and retry later.
		e.records = map[string]struct{}{}
		if s.blobs[d] == nil {
			s.blobs[d] = e
			s.stored += e.cost()
		}
		s.gaugesLocked()
		s.mu.Unlock()
		s.m.Errors.WithLabelValues("delete").Inc()
		s.log.Warn("evicting a blob failed", "digest", d, "error", err)
		return 0
	}
	s.mu.Unlock()
	s.m.Evictions.WithLabelValues(trigger).Inc()
	s.m.EvictedBytes.WithLabelValues(trigger).Add(float64(e.size))
	s.log.Debug("evicted", "digest", d, "size", e.size, "trigger", trigger, "last_access", time.Unix(0, e.atime).UTC())
	return cost
}

const anyAtime = -1

// evictAhead frees down to the low watermark once usage passes the high one, and keeps
// MinFree of the filesystem free.
func (s *Store) evictAhead(ctx context.Context) {
	if s.sh != nil && !s.IsLeader() {
		return
	}
	s.evictMu.Lock()
	defer s.evictMu.Unlock()
	if limit := s.cfg.MaxSize; limit > 0 {
		used := s.Used()
		var wanted int64
		if s.sh != nil {
			s.mu.Lock()
			used -= s.sh.doomedCost // chosen already, deleted when no replica reads them
			wanted = s.sh.wanted - s.sh.doomedCost
			s.sh.wanted = 0
			s.mu.Unlock()
		}
		if used > int64(s.cfg.High*float64(limit)) || wanted > 0 {
			need := max(used-int64(s.cfg.Low*float64(limit)), wanted)
			freed := s.evictBytes(ctx, need, triggerMaxSize)
			s.log.Info("evicted to the low watermark", "used_before", used, "freed", freed, "wanted", need, "limit", limit)
		}
	}
	if s.cfg.MinFree.IsZero() || s.cfg.Free == nil {
		return
	}
	free, total, err := s.cfg.Free()
	if err != nil {
		s.m.Errors.WithLabelValues("statfs").Inc()
		return
	}
	want := s.cfg.MinFree.want(total)
	if int64(free) >= want {
		return
	}
	// Free a tenth more than the shortfall's floor, so the trigger does not fire on
	// every fill.
	need := want - int64(free) + want/10
	freed := s.evictBytes(ctx, need, triggerMinFree)
	s.log.Info("evicted for free space", "free", free, "min_free", want, "freed", freed)
}

// Start loads the index (or starts rebuilding it in the background), resolves the pins,
// and runs the background evictor until Close.
func (s *Store) Start(ctx context.Context) {
	ctx, s.cancel = context.WithCancel(context.WithoutCancel(ctx))
	s.done = make(chan struct{})
	args := []any{"max_size", s.cfg.MaxSize, "pins", len(s.pins.patterns)}
	if s.cfg.MaxSize > 0 {
		args = append(args, "high", int64(s.cfg.High*float64(s.cfg.MaxSize)), "low", int64(s.cfg.Low*float64(s.cfg.MaxSize)))
	}
	if !s.cfg.MinFree.IsZero() {
		args = append(args, "min_free_bytes", s.cfg.MinFree.Bytes, "min_free_percent", s.cfg.MinFree.Percent)
	}
	if s.sh != nil {
		args = append(args, "shared_by_replicas", true, "sync_interval", s.sh.cfg.SyncInterval.String())
	}
	s.log.Info("storage bound", args...)
	if s.sh != nil {
		// The first round before serving: opens are refused until a record is written.
		_ = s.Sync(ctx)
		go s.loop(ctx, false)
		return
	}
	rebuild := s.loadIndex(ctx)
	s.loadPins(ctx)
	go s.loop(ctx, rebuild)
}

// Close stops the background work and writes the index, marked clean.
func (s *Store) Close(ctx context.Context) error {
	if s.cancel == nil {
		return nil
	}
	s.cancel()
	<-s.done
	s.cancel = nil
	if s.sh != nil {
		leader := s.IsLeader()
		s.closeShared(ctx)
		if !leader {
			return nil
		}
		return s.writeIndex(ctx, false) // the next leader walks the bucket anyway
	}
	s.closed.Store(true) // first: a change after the clean write's snapshot writes it unclean
	return s.writeIndex(ctx, true)
}

func (s *Store) loop(ctx context.Context, rebuild bool) {
	defer close(s.done)
	if s.sh != nil {
		s.sharedLoop(ctx)
		return
	}
	if rebuild {
		s.reconcile(ctx)
	}
	if !s.sweptLegacy() {
		s.sweep(ctx, legacyPrefixes, "legacy")
	}
	s.evictAhead(ctx)
	t := time.NewTicker(s.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.kick:
			s.evictAhead(ctx)
		case <-s.pinKick:
			s.resolvePins(ctx)
		case <-t.C:
			s.resolvePins(ctx)
			s.evictAhead(ctx)
			s.expirePending(ctx)
			s.mu.Lock()
			dirty := s.dirty
			s.mu.Unlock()
			if dirty {
				if err := s.writeIndex(ctx, false); err != nil && ctx.Err() == nil {
					s.log.Warn("writing the eviction index failed", "error", err)
				}
			}
		}
	}
}

// expirePending removes records learned for blobs that were never stored.
func (s *Store) expirePending(ctx context.Context) {
	limit := s.now().Add(-s.cfg.PendingGrace).UnixNano()
	var keys []string
	s.mu.Lock()
	for d, p := range s.pending {
		if p.since > limit {
			continue
		}
		if _, stored := s.blobs[d]; stored {
			continue
		}
		for k := range p.keys {
			keys = append(keys, k)
			delete(s.owner, k)
		}
		delete(s.pending, d)
		s.dirty = true
	}
	s.mu.Unlock()
	s.deleteRecords(ctx, keys)
	if len(keys) > 0 {
		s.m.RecordsCollected.WithLabelValues("expired").Add(float64(len(keys)))
	}
}

// sharedLoop is the background work of a shared Store: a round every SyncInterval; the
// leader also resolves pins, evicts ahead and expires pending records between rounds.
func (s *Store) sharedLoop(ctx context.Context) {
	t := time.NewTicker(s.sh.cfg.SyncInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.kick:
			s.evictAhead(ctx)
		case <-s.syncKick:
			_ = s.Sync(ctx)
		case <-s.pinKick:
			if s.IsLeader() {
				s.resolvePins(ctx)
			}
		case <-t.C:
			if err := s.Sync(ctx); err != nil || !s.IsLeader() {
				continue
			}
			s.resolvePins(ctx)
			s.expirePending(ctx)
		}
	}
}
