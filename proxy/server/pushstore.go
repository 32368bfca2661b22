package server

import (
	"context"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/cove-oci/cove/proxy/authz"
	"github.com/cove-oci/cove/proxy/fill"
	"github.com/cove-oci/cove/proxy/route"
	"github.com/cove-oci/cove/proxy/storage"
)

// Committing what a push taught. The origin's 201 is relayed at once; what follows it in
// the cache (the membership the 201 teaches, the verified spool file handed to storage
// with its fsyncs, a manifest's records) runs in the background, so a push waits for
// neither the cache's disk nor its records: the origin holds the object, the cache's
// copy is a copy. A request that could be served from that work waits for it instead
// (hasBlob waits for the pending work on its digest), so the first pull after a push is
// still a hit.

// maxStoreWait bounds how long a read waits for a pushed object still being committed.
const maxStoreWait = 30 * time.Second

type pendingStores struct {
	mu sync.Mutex
	m  map[fill.Key]*pendingStore
}

// pendingStore is the background work on one digest of one registry: memberships being
// learned (one task per push) and at most one copy being stored.
type pendingStore struct {
	tasks   int
	storing bool
	done    chan struct{} // closed when the last task ends
}

// begin registers a task on key. With store, it also claims the storing of the blob:
// claimed is false when another task is storing it already.
func (p *pendingStores) begin(key fill.Key, store bool) (claimed bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		p.m = map[fill.Key]*pendingStore{}
	}
	e := p.m[key]
	if e == nil {
		e = &pendingStore{done: make(chan struct{})}
		p.m[key] = e
	}
	e.tasks++
	if store && !e.storing {
		e.storing = true
		return true
	}
	return false
}

// end ends a task begun on key.
func (p *pendingStores) end(key fill.Key) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.m[key]
	e.tasks--
	if e.tasks == 0 {
		delete(p.m, key)
		close(e.done)
	}
}

// commitBlob follows the origin's 201 to a blob upload of want in req's repository: the
// membership it teaches, for this credential, and, when the spool holds exactly want,
// the blob stored (then provenance, which makes it servable for this registry). It runs
// on a context of its own: the client leaving does not undo it. A store failure costs a
// cache hit, never the push. sp may be nil (a mount, a POST without a body).
func (s *Server) commitBlob(r *http.Request, req *route.Request, sp *spool, want digest.Digest) {
	var path string
	var size int64
	ok := false
	if sp != nil {
		if path, size, ok = sp.finish(want); !ok {
			s.log.Info("pushed blob not kept: the spool could not follow the upload", "registry", req.Registry, "repository", req.Repository, "digest", want)
		}
	}
	key := fill.Key{Registry: req.Registry, Digest: want}
	if ok && !s.pending.begin(key, true) {
		os.Remove(path) // the same blob is being stored for this registry already
		ok = false
	} else if !ok {
		s.pending.begin(key, false)
	}
	cred := authz.CredentialOf(r.Header)
	ctx := context.WithoutCancel(r.Context())
	go func() {
		defer s.pending.end(key)
		// The origin's 201 to this credential for want in this repository.
		s.authz.Learn(ctx, cred, authz.Object{Registry: req.Registry, Repository: req.Repository, Digest: want})
		if ok {
			s.storePushedFile(ctx, req.Registry, want, size, path)
		}
	}()
}

// storePushedFile hands a spool file to storage once verified; path is removed either way.
func (s *Server) storePushedFile(ctx context.Context, registry string, d digest.Digest, size int64, path string) {
	if n, err := s.store.Stat(ctx, d); err == nil && n == size {
		// The store holds these bytes already (verified when stored): nothing to write
		// but this registry's provenance, which the origin's 201 taught.
		os.Remove(path)
		if err := s.recordProvenance(ctx, registry, d); err != nil {
			s.log.Warn("storing a pushed blob's provenance failed", "registry", registry, "digest", d, "error", err)
		}
		return
	}
	var err error
	if s.reserve != nil {
		release, rerr := s.reserve(ctx, fill.Key{Registry: registry, Digest: d}, size)
		if rerr != nil {
			os.Remove(path)
			s.log.Info("pushed blob not kept: no room in the store", "registry", registry, "digest", d, "error", rerr)
			return
		}
		defer func() { release(err == nil) }()
	}
	if ad, ok := s.store.(storage.FileAdopter); ok {
		// An adopter takes the file as it is: check it first (Put checks what it copies).
		if err = verifySpooled(path, size, d); err != nil {
			os.Remove(path)
			s.log.Info("pushed blob not kept: the bytes sent do not match its digest", "registry", registry, "digest", d, "error", err)
			return
		}
		err = ad.AdoptFile(ctx, d, size, path)
	} else {
		var f *os.File
		if f, err = os.Open(path); err == nil {
			err = s.store.Put(ctx, d, size, f)
			f.Close()
		}
		os.Remove(path)
	}
	if err == nil {
		err = s.recordProvenance(ctx, registry, d)
	}
	if err != nil {
		s.log.Warn("storing a pushed blob failed", "registry", registry, "digest", d, "error", err)
	}
}

// commitManifest follows the origin's 201 to a manifest PUT of d (body verified against
// it) in req's repository: the membership it teaches, the manifest stored, and a tag's
// record, in the background like commitBlob.
func (s *Server) commitManifest(r *http.Request, req *route.Request, d digest.Digest, body []byte) {
	key := fill.Key{Registry: req.Registry, Digest: d}
	s.pending.begin(key, false)
	r = r.WithContext(context.WithoutCancel(r.Context()))
	go func() {
		defer s.pending.end(key)
		s.keepPushedManifest(r, req, d, body)
	}()
}

// PendingStores is the number of pushed objects whose commit is still running (tests).
func (s *Server) PendingStores() int {
	s.pending.mu.Lock()
	defer s.pending.mu.Unlock()
	return len(s.pending.m)
}

// waitStored waits (at most maxStoreWait, or until ctx ends) until no pushed object of
// digests is still being committed for registry.
func (s *Server) waitStored(ctx context.Context, registry string, digests ...digest.Digest) {
	var timer *time.Timer
	for _, d := range digests {
		s.pending.mu.Lock()
		var done chan struct{}
		if e := s.pending.m[fill.Key{Registry: registry, Digest: d}]; e != nil {
			done = e.done
		}
		s.pending.mu.Unlock()
		if done == nil {
			continue
		}
		if timer == nil {
			timer = time.NewTimer(maxStoreWait)
			defer timer.Stop()
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
