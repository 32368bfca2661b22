package server

import (
	"context"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/fill"
	"github.com/cove-oci/cove/proxy/route"
	"github.com/cove-oci/cove/proxy/storage"
)

// Storing pushed blobs. The origin's 201 is relayed at once, and the verified spool file
// is handed to storage (a rename after fsync on the filesystem backend, an upload on S3)
// in the background, so the push does not wait for the cache's disk. A manifest PUT
// waits for the blobs it lists that are still being stored, so that once a push of an
// image has finished, its first pull is a hit.

// maxStoreWait bounds how long a manifest PUT waits for its blobs to be stored.
const maxStoreWait = 30 * time.Second

type pendingStores struct {
	mu sync.Mutex
	m  map[fill.Key]chan struct{}
}

// storeUploaded stores a blob the origin accepted (its 201) when the spool holds exactly
// the digest the client named: blob, then provenance, which makes it servable for this
// registry. It runs on a context of its own: the client leaving does not undo it. A
// failure costs a cache hit, never the push.
func (s *Server) storeUploaded(r *http.Request, req *route.Request, sp *spool, want digest.Digest) {
	path, size, ok := sp.finish(want)
	if !ok {
		s.log.Info("pushed blob not kept: the bytes sent do not match its digest, or the spool could not follow", "registry", req.Registry, "repository", req.Repository, "digest", want)
		return
	}
	key := fill.Key{Registry: req.Registry, Digest: want}
	done := make(chan struct{})
	s.pending.mu.Lock()
	if s.pending.m == nil {
		s.pending.m = map[fill.Key]chan struct{}{}
	}
	if _, busy := s.pending.m[key]; busy {
		s.pending.mu.Unlock()
		os.Remove(path) // the same blob is being stored for this registry already
		return
	}
	s.pending.m[key] = done
	s.pending.mu.Unlock()
	ctx := context.WithoutCancel(r.Context())
	go func() {
		defer func() {
			s.pending.mu.Lock()
			delete(s.pending.m, key)
			s.pending.mu.Unlock()
			close(done)
		}()
		var err error
		if s.reserve != nil {
			release, rerr := s.reserve(ctx, key, size)
			if rerr != nil {
				os.Remove(path)
				s.log.Info("pushed blob not kept: no room in the store", "registry", req.Registry, "digest", want, "error", rerr)
				return
			}
			defer func() { release(err == nil) }()
		}
		if ad, ok := s.store.(storage.FileAdopter); ok {
			err = ad.AdoptFile(ctx, want, size, path)
		} else {
			var f *os.File
			if f, err = os.Open(path); err == nil {
				err = s.store.Put(ctx, want, size, f)
				f.Close()
			}
			os.Remove(path)
		}
		if err == nil {
			err = s.recordProvenance(ctx, req.Registry, want)
		}
		if err != nil {
			s.log.Warn("storing a pushed blob failed", "registry", req.Registry, "digest", want, "error", err)
		}
	}()
}

// PendingStores is the number of pushed blobs still being stored (tests).
func (s *Server) PendingStores() int {
	s.pending.mu.Lock()
	defer s.pending.mu.Unlock()
	return len(s.pending.m)
}

// waitStored waits (at most maxStoreWait, or until ctx ends) until none of digests is
// still being stored for registry.
func (s *Server) waitStored(ctx context.Context, registry string, digests []digest.Digest) {
	timer := time.NewTimer(maxStoreWait)
	defer timer.Stop()
	for _, d := range digests {
		s.pending.mu.Lock()
		done := s.pending.m[fill.Key{Registry: registry, Digest: d}]
		s.pending.mu.Unlock()
		if done == nil {
			continue
		}
		select {
		case <-done:
		case <-timer.C:
			return
		case <-ctx.Done():
			return
		}
	}
}
