package metrics

import "github.com/prometheus/client_golang/prometheus"

// Store holds the storage bound's collectors (package evict sets them). They live apart
// from Metrics because the bounded store is built before the server that owns the
// registry: register them with Register.
type Store struct {
	LimitBytes       prometheus.Gauge
	StoredBytes      prometheus.Gauge
	ReservedBytes    prometheus.Gauge
	PinnedBytes      prometheus.Gauge
	Blobs            prometheus.Gauge
	Evictions        *prometheus.CounterVec
	EvictedBytes     *prometheus.CounterVec
	ReserveRefused   prometheus.Counter
	Errors           *prometheus.CounterVec
	WalkedBlobs      prometheus.Counter
	RecordsCollected *prometheus.CounterVec
	// EvictLeader and DoomedBlobs are the replicas' shared eviction (docs/scaleout.md).
	EvictLeader prometheus.Gauge
	DoomedBlobs prometheus.Gauge
	// SharedReservations counts reservations decided by the eviction leader.
	SharedReservations *prometheus.CounterVec
}

// NewStore creates the storage collectors, unregistered.
func NewStore() *Store {
	m := &Store{
		LimitBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cove_store_limit_bytes",
			Help: "The storage bound (--storage-max-size); 0 when unbounded.",
		}),
		StoredBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cove_store_bytes",
			Help: "Bytes the store holds as cove accounts them: blobs (rounded up to 4 KiB) and their records.",
		}),
		ReservedBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cove_store_reserved_bytes",
			Help: "Bytes reserved by fills in flight (counted against the bound before they are stored).",
		}),
		PinnedBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cove_store_pinned_bytes",
			Help: "Bytes of stored blobs that --pin keeps from eviction.",
		}),
		Blobs: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cove_store_blobs",
			Help: "Blobs the store holds.",
		}),
		Evictions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_store_evictions_total",
			Help: "Blobs evicted, by trigger (max-size: the high watermark or a reservation; min-free: the filesystem's free space).",
		}, []string{"trigger"}),
		EvictedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_store_evicted_bytes_total",
			Help: "Bytes of blobs evicted, by trigger.",
		}, []string{"trigger"}),
		ReserveRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cove_store_reservations_refused_total",
			Help: "Reservations refused room in the store even after eviction: fills (served to their clients, not stored; also counted in cove_fills_passed_through_total) and pushed blobs (written to the origin, not kept).",
		}),
		Errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_store_errors_total",
			Help: "Storage operations that failed, by operation (put, delete, delete-record, index, walk, sweep, pins, statfs, shared).",
		}, []string{"operation"}),
		WalkedBlobs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cove_store_walked_blobs_total",
			Help: "Blobs listed by a full walk of the store (0 after a restart with a clean index).",
		}),
		RecordsCollected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_store_records_removed_total",
			Help: "Records removed without their blob, by reason (orphan: their blob is gone; legacy: a format no longer read; expired: learned for a blob never stored).",
		}, []string{"reason"}),
		EvictLeader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cove_store_evict_leader",
			Help: "1 on the replica that evicts for every replica on the bucket (the leader), 0 on the others and on a single cove-cache (which evicts for itself).",
		}),
		DoomedBlobs: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cove_store_doomed_blobs",
			Help: "On the leader: blobs chosen for eviction and waiting until no replica can still be reading them.",
		}),
		SharedReservations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cove_store_shared_reservations_total",
			Help: "Replicas on one bucket: other replicas' reservations this leader granted, refused (no room: the fill passes through) or expired (its holder's records stopped listing it, or the holder went stale); on a follower, fallback: reservations made on the records' estimate because the leader did not answer in time.",
		}, []string{"result"}),
	}
	for _, r := range []string{"granted", "refused", "expired", "fallback"} {
		m.SharedReservations.WithLabelValues(r)
	}
	return m
}

// Register adds the collectors to reg.
func (s *Store) Register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{s.LimitBytes, s.StoredBytes, s.ReservedBytes, s.PinnedBytes, s.Blobs,
		s.Evictions, s.EvictedBytes, s.ReserveRefused, s.Errors, s.WalkedBlobs, s.RecordsCollected, s.EvictLeader, s.DoomedBlobs, s.SharedReservations} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}
