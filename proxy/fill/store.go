package fill

import (
	"errors"
	"os"
	"sync"
	"syscall"
	"time"
)

// Events are the hooks cove-cache's store metrics are made of. Any may be nil.
type Events struct {
	// StoreError is called for every store failure, by operation ("create" or "write"
	// of a spool file, "commit" of a verified blob) and reason (see Reason).
	StoreError func(op, reason string)
	// PassThrough is called for every fill whose blob is passed through unstored, with
	// the reason: a Reason of the spool's failure, or "reserve_refused".
	PassThrough func(reason string)
	// ReaderCut is called for every reader cut off behind a pass-through window.
	ReaderCut func()
	// Resume is called for every resume of an origin body cut short, with its result:
	// ResumeRanged, ResumeRestarted, or ResumeFailed (the fill gave up).
	Resume func(result string)
	// Condition is called when the store starts failing (degraded) and when it takes a
	// blob again.
	Condition func(degraded bool)
}

// ReasonReserveRefused is the pass-through reason of a reservation the ReserveFunc refused.
const ReasonReserveRefused = "reserve_refused"

// ReasonLargerThanStore is the pass-through reason of a blob the store could never hold.
const ReasonLargerThanStore = "larger_than_store"

// ErrLargerThanStore, wrapped in a ReserveFunc's error, says the blob is larger than the
// whole store: it is passed through, and the store is not degraded by it, since no
// amount of eviction would ever make room.
var ErrLargerThanStore = errors.New("blob larger than the store")

// Reason classifies a store error: no_space, quota, io_error, read_only, permission,
// too_large, or other. The set is fixed, so it can label metrics.
func Reason(err error) string {
	switch {
	case errors.Is(err, syscall.ENOSPC):
		return "no_space"
	case errors.Is(err, syscall.EDQUOT):
		return "quota"
	case errors.Is(err, syscall.EIO):
		return "io_error"
	case errors.Is(err, syscall.EROFS):
		return "read_only"
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return "permission"
	case errors.Is(err, syscall.EFBIG):
		return "too_large"
	}
	return "other"
}

// StoreCondition describes a store that cannot take blobs.
type StoreCondition struct {
	Op     string    // the failing operation: reserve, create, write or commit
	Reason string    // Reason of the error, or reserve_refused
	Error  string    // the last error's text
	Since  time.Time // when the condition started
}

// health is the store's condition as fills see it: degraded from a failure until a fill
// stores a blob again. It is no sticky flag: every fill tries the store.
//
// A store short of room takes small blobs (configs, manifests) while it fails large ones:
// only a blob at least as large as the smallest one it failed during the condition ends
// it, so the condition does not flap with every small blob.
type health struct {
	mu        sync.Mutex
	degraded  bool
	cond      StoreCondition
	minFailed int64 // the smallest size failed during the condition (0: unknown size)
}

// StoreDegraded reports whether the store is failing: the last fill that tried to
// store its blob could not, and none has stored one since.
func (m *Manager) StoreDegraded() (StoreCondition, bool) {
	m.health.mu.Lock()
	defer m.health.mu.Unlock()
	return m.health.cond, m.health.degraded
}

// storeFailed records a store error of op for f and returns its reason. It logs once
// per condition: on entering it, and when its operation or reason changes.
// storeFailed records a store error of op for f's blob of size bytes (-1: unknown) and
// returns its reason. It logs once per condition: on entering it, and when its reason
// changes.
func (m *Manager) storeFailed(f *Fill, size int64, op string, err error) string {
	reason := Reason(err)
	if fn := m.events.StoreError; fn != nil {
		fn(op, reason)
	}
	m.degrade(f, size, op, reason, err)
	return reason
}

// reserveRefused records a refused reservation for f and returns the pass-through reason.
func (m *Manager) reserveRefused(f *Fill, size int64, err error) string {
	if errors.Is(err, ErrLargerThanStore) {
		m.log.Debug("blob larger than the store: passing it through", "registry", f.Key.Registry, "digest", f.Key.Digest, "size", size)
		return ReasonLargerThanStore
	}
	m.degrade(f, size, "reserve", ReasonReserveRefused, err)
	return ReasonReserveRefused
}

func (m *Manager) degrade(f *Fill, size int64, op, reason string, err error) {
	size = max(size, 0)
	m.health.mu.Lock()
	was, prev := m.health.degraded, m.health.cond
	m.health.degraded = true
	m.health.cond = StoreCondition{Op: op, Reason: reason, Error: err.Error(), Since: prev.Since}
	if !was {
		m.health.cond.Since = time.Now()
		m.health.minFailed = size
	}
	m.health.minFailed = min(m.health.minFailed, size)
	m.health.mu.Unlock()
	args := []any{"operation", op, "reason", reason, "error", err, "registry", f.Key.Registry, "digest", f.Key.Digest, "size", size}
	switch {
	case !was:
		m.log.Warn("store cannot take blobs: passing fills through unstored until it can", args...)
		if fn := m.events.Condition; fn != nil {
			fn(true)
		}
	case prev.Reason != reason:
		m.log.Warn("store still cannot take blobs, for another reason", args...)
	default:
		m.log.Debug("store cannot take blob: passing it through", args...)
	}
}

// storeOK records a blob of size bytes stored: the end of a degraded condition, logged
// once, when it is at least as large as the smallest blob the condition failed.
func (m *Manager) storeOK(size int64) {
	m.health.mu.Lock()
	was, cond := m.health.degraded, m.health.cond
	if was && size < m.health.minFailed {
		m.health.mu.Unlock()
		return
	}
	m.health.degraded = false
	m.health.cond = StoreCondition{}
	m.health.mu.Unlock()
	if was {
		m.log.Info("store takes blobs again", "was", cond.Reason, "degraded_for", time.Since(cond.Since).Round(time.Millisecond).String())
		if fn := m.events.Condition; fn != nil {
			fn(false)
		}
	}
}

func (m *Manager) passedThrough(reason string) {
	if fn := m.events.PassThrough; fn != nil {
		fn(reason)
	}
}

// removeName unlinks a spool file that will not be stored; its descriptor stays open
// for readers of the bytes it has.
func removeName(file *os.File) error { return os.Remove(file.Name()) }
