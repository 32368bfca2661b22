package evict

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/cluster"
)

// Shared eviction: several replicas on one bucket (docs/scaleout.md, "Shared eviction").
// What they must agree on lives in the bucket, under evict/, because every replica
// already reaches it and nothing else is shared:
//
//	evict/seen/<member>    each replica, every SyncInterval: the blobs it stored or read
//	                       and the records it wrote since the leader last merged them, the
//	                       blobs it has open now, its reserved bytes, and which doomed
//	                       lists it has installed (acks)
//	evict/doomed/<member>  the leader, every SyncInterval: the blobs it chose to evict
//	evict/usage            the leader: what the bucket holds, for the others' gauges and
//	                       reservations
//	evict/index            the leader: the index (access times, sizes, records)
//
// One replica evicts, the leader: cluster.Owner of the live members for "evict". It
// deletes a blob in two phases: first it dooms it (lists it in its doomed record), and
// every replica that reads that record refuses to open the blob from then on (a miss:
// it is served from the origin); then it deletes it once every live replica has written
// a record that acknowledges that doomed list and does not list the blob open. A replica
// that cannot write its record for StaleAfter/2 refuses every open and cuts its readers
// off; the others stop waiting for it after StaleAfter without a new record.

// Shared makes a Store one of several replicas on one bucket.
type Shared struct {
	// Self is this replica's member URL (cluster.ParseMember's form).
	Self string
	// Members returns the current members, self included (cluster.Membership.Members).
	Members func() []string
	// SyncInterval is how often the records are read and written (default 10 s).
	SyncInterval time.Duration
	// StaleAfter is how long a replica's record may stay unchanged before the others
	// stop waiting for it (default 6 SyncIntervals; at least 3).
	StaleAfter time.Duration
}

type touch struct {
	size   int64
	atime  int64
	stored bool
	ts     uint64
}

type recTouch struct {
	d  digest.Digest
	ts uint64
}

// view is what this replica last saw of another's record: it is live while its Seq
// changes, by this replica's own clock (no clock is compared across replicas).
type view struct {
	seq     uint64
	changed time.Time
}

func (v *view) see(seq uint64, now time.Time) {
	if v.changed.IsZero() || v.seq != seq {
		v.seq, v.changed = seq, now
	}
}

// sharedState is a replica's part of shared eviction. The fields up to syncMu are
// guarded by Store.mu; the rest by syncMu (one Sync at a time).
type sharedState struct {
	cfg Shared

	leader   bool
	lastSync time.Time // last seen record written (zero: none yet, so every open is refused)
	refused  map[digest.Digest]struct{}
	touchSeq uint64
	touched  map[digest.Digest]*touch
	recs     map[string]*recTouch
	usage    usageRecord
	// leader only:
	othersReserved int64
	openElsewhere  map[digest.Digest]struct{}
	doomed         map[digest.Digest]*doom
	doomedCost     int64
	mergedSnap     map[string]uint64 // the leader's merged, for reservations
	stale          map[string]bool   // replicas whose record stopped changing
	// seq numbers this replica's records and the reservations it asks the leader for
	// from one counter, so a record whose Seq is past a grant's was taken after the
	// grant was asked for (shared_grants.go).
	seq       uint64
	grantBook       // leader only: the reservations it granted (shared_grants.go)
	wanted    int64 // leader only: room a refused reservation lacked, freed by the next eviction
	// follower: the leader that last did not decide a reservation, asked again after
	linkDown      string
	linkDownUntil time.Time

	syncMu      sync.Mutex
	doomSeq     uint64
	lastDoomed  time.Time // the leader's last doomed record written
	writers     map[string]*view
	peers       map[string]*view
	merged      map[string]uint64
	deletedAt   map[digest.Digest]time.Time
	failing     bool
	manual      bool // tests: rounds only when Sync is called
	reconciling sync.WaitGroup
}

type doom struct {
	seq  uint64 // the first doomed record listing it (0: not written yet)
	cost int64
}

func newShared(cfg Shared) (*sharedState, error) {
	if cfg.Self == "" || cfg.Members == nil {
		return nil, errors.New("evict: shared eviction needs Self and Members")
	}
	if cfg.SyncInterval == 0 {
		cfg.SyncInterval = 10 * time.Second
	}
	if cfg.StaleAfter == 0 {
		cfg.StaleAfter = 6 * cfg.SyncInterval
	}
	if cfg.SyncInterval < 0 || cfg.StaleAfter < 3*cfg.SyncInterval {
		return nil, errors.New("evict: want a positive SyncInterval and StaleAfter of at least 3 SyncIntervals")
	}
	// Sequence numbers start at the wall clock, so a restarted replica's counters only
	// grow: an acknowledgement or a merge of its previous run never covers a new event.
	start := uint64(time.Now().UnixNano())
	return &sharedState{cfg: cfg, seq: start, doomSeq: start, touchSeq: start, refused: map[digest.Digest]struct{}{}, touched: map[digest.Digest]*touch{},
		recs: map[string]*recTouch{}, openElsewhere: map[digest.Digest]struct{}{}, doomed: map[digest.Digest]*doom{},
		writers: map[string]*view{}, peers: map[string]*view{}, merged: map[string]uint64{},
		deletedAt: map[digest.Digest]time.Time{}, grantBook: newGrantBook()}, nil
}

// fencedLocked reports whether this replica has gone too long without writing its
// record: the others may stop waiting for it soon, so it opens nothing. s.mu held.
func (s *Store) fencedLocked() bool {
	sh := s.sh
	return sh != nil && (sh.lastSync.IsZero() || s.now().Sub(sh.lastSync) > sh.cfg.StaleAfter/2)
}

// refusedLocked reports whether d must not be opened here now. s.mu held.
func (s *Store) refusedLocked(d digest.Digest) bool {
	if _, gone := s.deleting[d]; gone {
		return true
	}
	if s.sh == nil {
		return false
	}
	_, doomed := s.sh.refused[d]
	return doomed || s.fencedLocked()
}

// errFenced cuts a reader off on a replica that lost the bucket's records.
var errFenced = fmt.Errorf("%w: this replica cannot reach the shared eviction records: reads are cut off rather than risk a blob deleted under them", errdefs.ErrUnavailable)

// touchLocked notes a use of d for the next seen record. s.mu held.
func (s *Store) touchLocked(d digest.Digest, e *entry, stored bool) {
	if s.sh == nil {
		return
	}
	s.sh.touchSeq++
	t := s.sh.touched[d]
	if t == nil {
		t = &touch{}
		s.sh.touched[d] = t
	}
	t.size, t.atime, t.ts = e.size, e.atime, s.sh.touchSeq
	t.stored = t.stored || stored
}

func (s *Store) recordTouchLocked(key string, d digest.Digest) {
	if s.sh == nil {
		return
	}
	s.sh.touchSeq++
	s.sh.recs[key] = &recTouch{d: d, ts: s.sh.touchSeq}
}

// kickSync asks for a shared eviction round now: what this replica reserved or stored
// reaches the others' reservations within one round trip rather than one interval.
func (s *Store) kickSync() {
	if s.sh == nil || s.sh.manual {
		return
	}
	select {
	case s.syncKick <- struct{}{}:
	default:
	}
}

// IsLeader reports whether this replica evicts for all (always true for a Store of
// its own).
func (s *Store) IsLeader() bool {
	if s.sh == nil {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sh.leader
}

// Sync is one round of shared eviction (the background loop calls it every
// SyncInterval): install the doomed lists, write this replica's record, read the
// others', and lead or follow. The order matters: a blob doomed in a list this replica
// acknowledges was refused before its open set was taken.
func (s *Store) Sync(ctx context.Context) error {
	sh := s.sh
	if sh == nil {
		return nil
	}
	sh.syncMu.Lock()
	defer sh.syncMu.Unlock()
	now := s.now()
	refused, acks, err := s.readDoomed(ctx, now)
	if err != nil {
		return s.syncFailed("reading the doomed lists", err)
	}
	s.mu.Lock()
	for d := range sh.doomed {
		refused[d] = struct{}{}
	}
	sh.refused = refused
	rec := seenRecord{Version: sharedFormat, Member: sh.cfg.Self, Acks: acks, Reserved: s.reserved, Grants: s.heldGrantsLocked()}
	for d, e := range s.blobs {
		if e.refs > 0 {
			rec.Open = append(rec.Open, d)
		}
	}
	for d := range s.opening {
		if e := s.blobs[d]; e == nil || e.refs == 0 {
			rec.Open = append(rec.Open, d)
		}
	}
	for d, t := range sh.touched {
		rec.Touched = append(rec.Touched, seenBlob{Digest: d, Size: t.size, Atime: t.atime, Stored: t.stored, Ts: t.ts})
	}
	for k, r := range sh.recs {
		rec.Records = append(rec.Records, seenKey{Key: k, Digest: r.d, Ts: r.ts})
	}
	sh.seq++
	rec.Seq = sh.seq
	s.mu.Unlock()
	if err := s.putJSON(ctx, memberKey(seenPrefix, sh.cfg.Self), rec); err != nil {
		return s.syncFailed("writing this replica's record", err)
	}
	s.mu.Lock()
	sh.lastSync = now
	s.mu.Unlock()
	peers, err := s.readSeen(ctx, now)
	if err != nil {
		return s.syncFailed("reading the replicas' records", err)
	}
	if sh.failing {
		sh.failing = false
		s.log.Info("shared eviction records reachable again")
	}
	stale := map[string]bool{}
	for m := range peers {
		stale[m] = !s.fresh(sh.peers[m], now)
	}
	s.mu.Lock()
	sh.stale = stale
	s.mu.Unlock()
	live := []string{}
	for _, m := range sh.cfg.Members() {
		if p := peers[m]; m == sh.cfg.Self || (p != nil && !p.Closed && s.fresh(sh.peers[m], now)) {
			live = append(live, m)
		}
	}
	if cluster.Owner(live, leaderKey) == sh.cfg.Self {
		return s.lead(ctx, peers, now)
	}
	return s.follow(ctx)
}

func (s *Store) fresh(v *view, now time.Time) bool {
	return v != nil && now.Sub(v.changed) <= s.sh.cfg.StaleAfter
}

// syncFailed logs the first failure of a run of them: this replica does not evict, and
// after StaleAfter/2 it opens nothing.
func (s *Store) syncFailed(what string, err error) error {
	s.m.Errors.WithLabelValues("shared").Inc()
	if !s.sh.failing {
		s.sh.failing = true
		s.log.Warn("shared eviction records unreachable: not evicting; blobs are not opened here after half the stale limit", "step", what, "stale_after", s.sh.cfg.StaleAfter.String(), "error", err)
	}
	return fmt.Errorf("evict: %s: %w", what, err)
}

// readDoomed reads the live leaders' doomed lists (this replica's own is in memory)
// and returns the digests they doom and the seq of each list.
func (s *Store) readDoomed(ctx context.Context, now time.Time) (map[digest.Digest]struct{}, map[string]uint64, error) {
	sh := s.sh
	refused := map[digest.Digest]struct{}{}
	acks := map[string]uint64{}
	var keys []string
	if err := s.inner.ListRecords(ctx, doomedPrefix, func(k string) error { keys = append(keys, k); return nil }); err != nil {
		return nil, nil, err
	}
	for _, k := range keys {
		var rec doomedRecord
		if err := s.getJSON(ctx, k, &rec); errdefs.IsNotFound(err) {
			continue
		} else if err != nil {
			return nil, nil, err
		}
		if rec.Member == sh.cfg.Self {
			continue
		}
		v := sh.writers[rec.Member]
		if v == nil {
			v = &view{}
			sh.writers[rec.Member] = v
		}
		v.see(rec.Seq, now)
		// A leader rewrites its list every SyncInterval; one that stopped no longer
		// deletes (it checks its own writes), so its list no longer binds.
		if now.Sub(v.changed) > sh.cfg.StaleAfter || len(rec.Doomed) == 0 {
			continue
		}
		for _, d := range rec.Doomed {
			refused[d] = struct{}{}
		}
		acks[rec.Member] = rec.Seq
	}
	return refused, acks, nil
}

// readSeen reads the other replicas' records, by member.
func (s *Store) readSeen(ctx context.Context, now time.Time) (map[string]*seenRecord, error) {
	var keys []string
	if err := s.inner.ListRecords(ctx, seenPrefix, func(k string) error { keys = append(keys, k); return nil }); err != nil {
		return nil, err
	}
	out := map[string]*seenRecord{}
	for _, k := range keys {
		if k == memberKey(seenPrefix, s.sh.cfg.Self) {
			continue
		}
		var rec seenRecord
		if err := s.getJSON(ctx, k, &rec); errdefs.IsNotFound(err) {
			continue
		} else if err != nil {
			return nil, err
		}
		v := s.sh.peers[rec.Member]
		if v == nil {
			v = &view{}
			s.sh.peers[rec.Member] = v
		}
		v.see(rec.Seq, now)
		out[rec.Member] = &rec
	}
	return out, nil
}

// follow is a non-leader's round: give up leadership if it was held, and read the
// leader's usage for the gauges and reservations.
func (s *Store) follow(ctx context.Context) error {
	sh := s.sh
	s.mu.Lock()
	was := sh.leader
	sh.leader = false
	if was {
		for d := range sh.doomed {
			delete(sh.refused, d)
		}
		sh.doomed, sh.doomedCost = map[digest.Digest]*doom{}, 0
		s.dropGrantsLocked()
	}
	s.mu.Unlock()
	if was {
		s.m.EvictLeader.Set(0)
		s.m.DoomedBlobs.Set(0)
		s.log.Info("no longer the eviction leader")
		sh.doomSeq++
		if err := s.putJSON(ctx, memberKey(doomedPrefix, sh.cfg.Self), doomedRecord{Version: sharedFormat, Member: sh.cfg.Self, Seq: sh.doomSeq}); err != nil {
			s.log.Warn("clearing this replica's doomed list failed", "error", err)
		}
	}
	var u usageRecord
	if err := s.getJSON(ctx, usageKey, &u); err != nil {
		if errdefs.IsNotFound(err) {
			return nil
		}
		return s.syncFailed("reading the usage", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	sh.usage = u
	merged := u.Merged[sh.cfg.Self]
	for d, t := range sh.touched {
		if t.ts <= merged {
			delete(sh.touched, d)
		}
	}
	for k, r := range sh.recs {
		if r.ts <= merged {
			delete(sh.recs, k)
		}
	}
	// A follower keeps only what it has open or still has to report.
	for d, e := range s.blobs {
		if e.refs == 0 && sh.touched[d] == nil {
			delete(s.blobs, d)
			for k := range e.records {
				delete(s.owner, k)
			}
		}
	}
	for d, p := range s.pending {
		for k := range p.keys {
			if sh.recs[k] == nil {
				delete(p.keys, k)
				delete(s.owner, k)
			}
		}
		if len(p.keys) == 0 {
			delete(s.pending, d)
		}
	}
	s.stored = 0
	s.gaugesLocked()
	return nil
}

// followerUsedLocked is what a follower counts against the bound: the leader's account,
// the other replicas' reservations as the leader last saw them, its own reservations,
// and the blobs it stored that the leader has not merged yet. s.mu held.
func (s *Store) followerUsedLocked() int64 {
	sh := s.sh
	used := sh.usage.Stored + s.reserved
	for m, r := range sh.usage.Reserved {
		if m != sh.cfg.Self {
			used += r
		}
	}
	for _, t := range sh.touched {
		if t.stored {
			used += blobCost(t.size) + recordCost
		}
	}
	return used
}

// closeShared writes a last record saying this replica stopped (not waited for) and,
// on the leader, an empty doomed list.
func (s *Store) closeShared(ctx context.Context) {
	sh := s.sh
	sh.reconciling.Wait()
	sh.syncMu.Lock()
	defer sh.syncMu.Unlock()
	s.mu.Lock()
	sh.seq++
	seq := sh.seq
	s.mu.Unlock()
	_ = s.putJSON(ctx, memberKey(seenPrefix, sh.cfg.Self), seenRecord{Version: sharedFormat, Member: sh.cfg.Self, Seq: seq, Closed: true})
	if s.IsLeader() {
		sh.doomSeq++
		_ = s.putJSON(ctx, memberKey(doomedPrefix, sh.cfg.Self), doomedRecord{Version: sharedFormat, Member: sh.cfg.Self, Seq: sh.doomSeq})
	}
}
