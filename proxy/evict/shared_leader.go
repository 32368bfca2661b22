package evict

import (
	"context"
	"slices"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
)

// lead is the leader's round: merge what the others reported, delete the doomed blobs
// nobody can be reading any more, doom more when past the high watermark, and publish
// the doomed list, the usage and the index.
func (s *Store) lead(ctx context.Context, peers map[string]*seenRecord, now time.Time) error {
	sh := s.sh
	s.mu.Lock()
	was := sh.leader
	sh.leader = true
	s.mu.Unlock()
	if !was {
		s.becomeLeader(ctx)
	}
	live := map[string]*seenRecord{}
	for m, rec := range peers {
		if !rec.Closed && s.fresh(sh.peers[m], now) {
			live[m] = rec
		}
	}
	s.merge(ctx, peers, live)
	s.expireGrants(peers, live, now)
	s.forgetGone(ctx, now)
	s.deleteDoomed(ctx, live, now)
	s.evictAhead(ctx)

	// The doomed list, rewritten every round: its changing seq keeps it binding.
	s.mu.Lock()
	list := make([]digest.Digest, 0, len(sh.doomed))
	var unpublished []digest.Digest
	for d, dm := range sh.doomed {
		list = append(list, d)
		if dm.seq == 0 {
			unpublished = append(unpublished, d)
		}
	}
	s.mu.Unlock()
	slices.Sort(list)
	sh.doomSeq++
	if err := s.putJSON(ctx, memberKey(doomedPrefix, sh.cfg.Self), doomedRecord{Version: sharedFormat, Member: sh.cfg.Self, Seq: sh.doomSeq, Doomed: list}); err != nil {
		return s.syncFailed("writing the doomed list", err)
	}
	sh.lastDoomed = now
	s.mu.Lock()
	for _, d := range unpublished {
		if dm := sh.doomed[d]; dm != nil && dm.seq == 0 {
			dm.seq = sh.doomSeq
		}
	}
	u := usageRecord{Version: sharedFormat, Leader: sh.cfg.Self, Stored: s.stored + s.unlinking + s.indexBytes, Blobs: len(s.blobs),
		Reserved: map[string]int64{sh.cfg.Self: s.reserved}, Merged: map[string]uint64{}}
	for d := range s.pinned {
		if e := s.blobs[d]; e != nil {
			u.Pinned += e.size
		}
	}
	for m, rec := range live {
		u.Reserved[m] = rec.Reserved
	}
	for m, ts := range sh.merged {
		u.Merged[m] = ts
	}
	sh.mergedSnap = u.Merged
	// The leader merges its own uses directly.
	sh.touched, sh.recs = map[digest.Digest]*touch{}, map[string]*recTouch{}
	sh.usage = u
	dirty := s.dirty
	s.m.DoomedBlobs.Set(float64(len(sh.doomed)))
	s.mu.Unlock()
	if err := s.putJSON(ctx, usageKey, u); err != nil {
		return s.syncFailed("writing the usage", err)
	}
	if dirty {
		if err := s.writeIndex(ctx, false); err != nil && ctx.Err() == nil {
			s.log.Warn("writing the eviction index failed", "error", err)
		}
	}
	return nil
}

// becomeLeader takes over: the index the last leader wrote, the pins, and a walk of the
// bucket in the background for what neither knew (the other replicas report only what
// they did since the leader last merged their records).
func (s *Store) becomeLeader(ctx context.Context) {
	sh := s.sh
	s.m.EvictLeader.Set(1)
	s.log.Info("this replica is the eviction leader", "self", sh.cfg.Self)
	for m, ts := range sh.usage.Merged {
		sh.merged[m] = max(sh.merged[m], ts)
	}
	// A follower does not account what it keeps (it shows the leader's usage): count it.
	s.mu.Lock()
	s.stored = 0
	for _, e := range s.blobs {
		s.stored += e.cost()
	}
	s.mu.Unlock()
	s.loadIndex(ctx)
	s.loadPins(ctx)
	sh.reconciling.Add(1)
	go func() {
		defer sh.reconciling.Done()
		s.reconcile(ctx)
		if !s.sweptLegacy() {
			s.sweep(ctx, legacyPrefixes, "legacy")
		}
	}()
}

// merge takes in the other replicas' reports: access times (the latest wins), blobs
// they stored, records they wrote (pins hook in there), and from the live ones their
// reservations and open blobs.
func (s *Store) merge(ctx context.Context, peers, live map[string]*seenRecord) {
	sh := s.sh
	for m, rec := range peers {
		last := sh.merged[m]
		top := last
		for _, t := range rec.Touched {
			if t.Ts > last && t.Digest.Validate() == nil && t.Size >= 0 {
				top = max(top, t.Ts)
				s.mergeBlob(ctx, t)
			}
		}
		for _, k := range rec.Records {
			if k.Ts <= last || k.Digest.Validate() != nil {
				continue
			}
			top = max(top, k.Ts)
			s.attach(k.Key, k.Digest)
			if s.pins.matches(k.Key) {
				s.pins.setRoot(k.Key, k.Digest)
				s.pinsDirty.Store(true)
			} else if len(s.pins.patterns) > 0 && strings.HasPrefix(k.Key, "manifesttype/") {
				s.pinsDirty.Store(true)
			}
		}
		sh.merged[m] = top
	}
	var reserved int64
	open := map[digest.Digest]struct{}{}
	for _, rec := range live {
		reserved += rec.Reserved
		for _, d := range rec.Open {
			open[d] = struct{}{}
		}
	}
	s.mu.Lock()
	sh.othersReserved, sh.openElsewhere = reserved, open
	s.gaugesLocked()
	s.mu.Unlock()
	s.kickEvict()
}

// mergeBlob takes one reported use. A read of a blob the leader does not know adds
// nothing (it was deleted since, or the walk finds it); a blob stored that the leader
// deleted lately is checked in the bucket first (the report may predate the deletion).
func (s *Store) mergeBlob(ctx context.Context, t seenBlob) {
	sh := s.sh
	s.mu.Lock()
	if e := s.blobs[t.Digest]; e != nil {
		if t.Atime > e.atime {
			e.atime = t.Atime
			s.dirty = true
		}
		s.mu.Unlock()
		return
	}
	_, recent := sh.deletedAt[t.Digest]
	s.mu.Unlock()
	if !t.Stored {
		return
	}
	if recent {
		if _, err := s.inner.Stat(ctx, t.Digest); err != nil {
			return
		}
	}
	e := s.added(t.Digest, t.Size, addStored)
	s.mu.Lock()
	if t.Atime > 0 && s.blobs[t.Digest] == e {
		e.atime = t.Atime
	}
	s.mu.Unlock()
}

// doom is shared eviction's first phase for one blob (evictOne on the leader): from now
// on it is refused here, and once the doomed list is written, everywhere.
func (s *Store) doom(d digest.Digest, atime int64) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	sh := s.sh
	e := s.blobs[d]
	_, pin := s.pinned[d]
	_, elsewhere := sh.openElsewhere[d]
	_, already := sh.doomed[d]
	if e == nil || e.refs > 0 || s.opening[d] > 0 || pin || elsewhere || already || (atime != anyAtime && e.atime != atime) {
		return 0
	}
	cost := e.cost()
	sh.doomed[d] = &doom{cost: cost}
	sh.doomedCost += cost
	sh.refused[d] = struct{}{}
	s.m.DoomedBlobs.Set(float64(len(sh.doomed)))
	return cost
}

// deleteDoomed is the second phase: a doomed blob goes once every live replica has
// acknowledged a doomed list naming it and does not have it open. Nothing is deleted
// when this leader's own list may have stopped binding (not written for StaleAfter/2).
func (s *Store) deleteDoomed(ctx context.Context, live map[string]*seenRecord, now time.Time) {
	sh := s.sh
	for d, t := range sh.deletedAt {
		if now.Sub(t) > 2*sh.cfg.StaleAfter {
			delete(sh.deletedAt, d)
		}
	}
	if sh.lastDoomed.IsZero() || now.Sub(sh.lastDoomed) > sh.cfg.StaleAfter/2 {
		return
	}
	s.mu.Lock()
	ready := []digest.Digest{}
	for d, dm := range sh.doomed {
		if dm.seq == 0 {
			continue
		}
		ok := true
		for _, rec := range live {
			if rec.Acks[sh.cfg.Self] < dm.seq || slices.Contains(rec.Open, d) {
				ok = false
				break
			}
		}
		if ok {
			ready = append(ready, d)
		}
	}
	s.mu.Unlock()
	for _, d := range ready {
		// Bounded: a store that makes a DELETE wait (MinIO does, for a GET in progress)
		// must not stall the rounds that keep this leader's records fresh.
		dctx, cancel := context.WithTimeout(ctx, sh.cfg.StaleAfter/4)
		freed := s.removeBlob(dctx, d, anyAtime, triggerMaxSize)
		cancel()
		s.mu.Lock()
		if dm := sh.doomed[d]; dm != nil {
			delete(sh.doomed, d)
			sh.doomedCost -= dm.cost
		}
		delete(sh.refused, d)
		if freed > 0 {
			sh.deletedAt[d] = now
		}
		s.mu.Unlock()
	}
}

// forgetGone removes the records of replicas that left: silent for twice StaleAfter
// and no longer members (a pod replaced under a new address leaves one behind).
func (s *Store) forgetGone(ctx context.Context, now time.Time) {
	sh := s.sh
	members := sh.cfg.Members()
	for m, v := range sh.peers {
		if now.Sub(v.changed) <= 2*sh.cfg.StaleAfter || slices.Contains(members, m) {
			continue
		}
		for _, k := range []string{memberKey(seenPrefix, m), memberKey(doomedPrefix, m)} {
			if err := s.inner.DeleteRecord(ctx, k); err != nil && !errdefs.IsNotFound(err) {
				s.log.Warn("removing a departed replica's record failed", "member", m, "error", err)
				return
			}
		}
		delete(sh.peers, m)
		delete(sh.writers, m)
		s.log.Info("removed the eviction records of a replica that left", "member", m)
	}
}
