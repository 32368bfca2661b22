// Package prefill fills the node's content store with the blobs an image manifest names,
// as soon as the resolver hook has served that manifest, so that containerd finds them
// when it asks and skips its own download.
//
// Why this order works: containerd's pull asks the content store for each blob's Info
// (inside its metadata transaction) before fetching it; a blob that is there with the
// right size is taken as is (content sharing policy "shared"). The resolver hook holds
// the manifest's body back, for a bounded time, until the prefill is done, so containerd
// reaches those Info calls after the blobs have landed. Each prefill is fetched from
// cove-cache with the same credentials that fetched the manifest, so it covers exactly
// what the tenant proved it may read, and it is verified before it becomes visible.
//
// Blobs that land before containerd claims them are unreferenced in containerd's
// metadata, so its garbage collector would delete them: every prefilled blob is handed
// to Protect for a while.
package prefill

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/cove-oci/cove/plugin/mirror"
	"github.com/cove-oci/cove/proxy/fill"
)

// FetchFunc GETs a blob of (registry, repository) from cove-cache with the client's
// headers.
type FetchFunc func(ctx context.Context, registry, repository string, d digest.Digest, header http.Header) (*http.Response, error)

// Config configures a Prefiller.
type Config struct {
	// ContentRoot is the content store's directory, laid out as containerd's built-in
	// store (<root>/blobs/<algorithm>/<encoded>).
	ContentRoot string
	// SpoolDir holds blobs being fetched; it must be on ContentRoot's filesystem.
	SpoolDir string
	// Fetch gets a blob from cove-cache.
	Fetch FetchFunc
	// Protect shields a landed blob from containerd's GC until the given time.
	Protect func(d digest.Digest, until time.Time)
	// MaxHold bounds how long a manifest's body is held for its prefill (default 20 s:
	// containerd waits for a body without limit, but CRI cancels a pull that shows no
	// progress for 5 minutes, and a cold origin should not stall the pull's start).
	MaxHold time.Duration
	// ProtectFor is how long a landed blob is protected (default 30 min).
	ProtectFor time.Duration
	// Parallel bounds concurrent blob fetches (default 8), each from its request to the
	// end of its body; a prefill waits for a slot at most MaxHold, and not at all once
	// containerd asks for its blob.
	Parallel int
	Logger   *slog.Logger
}

// Prefiller runs prefills.
type Prefiller struct {
	cfg   Config
	fills *fill.Manager
	sem   chan struct{}
	log   *slog.Logger

	mu     sync.Mutex
	queued map[digest.Digest]chan struct{} // prefills waiting for a slot; closed on demand
}

// New returns a Prefiller. The spool directory is emptied.
func New(cfg Config) (*Prefiller, error) {
	if cfg.ContentRoot == "" || cfg.SpoolDir == "" || cfg.Fetch == nil {
		return nil, fmt.Errorf("prefill: content root, spool directory and fetch are required")
	}
	if cfg.MaxHold == 0 {
		cfg.MaxHold = 20 * time.Second
	}
	if cfg.ProtectFor == 0 {
		cfg.ProtectFor = 30 * time.Minute
	}
	if cfg.Parallel == 0 {
		cfg.Parallel = 8
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Protect == nil {
		cfg.Protect = func(digest.Digest, time.Time) {}
	}
	p := &Prefiller{cfg: cfg, sem: make(chan struct{}, cfg.Parallel), log: cfg.Logger, queued: map[digest.Digest]chan struct{}{}}
	m, err := fill.NewManager(cfg.SpoolDir, p.commit, fill.WithLogger(cfg.Logger))
	if err != nil {
		return nil, err
	}
	p.fills = m
	return p, nil
}

// Fills exposes the in-flight prefills, so the resolver hook can serve containerd's own
// GET of a blob being prefilled from the same fetch.
func (p *Prefiller) Fills() *fill.Manager { return p.fills }

func (p *Prefiller) blobPath(d digest.Digest) string {
	return filepath.Join(p.cfg.ContentRoot, "blobs", d.Algorithm().String(), d.Encoded())
}

// has reports whether the store holds d with this size.
func (p *Prefiller) has(d digest.Digest, size int64) bool {
	fi, err := os.Stat(p.blobPath(d))
	return err == nil && fi.Size() == size
}

// commit moves a verified spool file into the store, read-only like containerd's own
// blobs, and protects it from the GC until containerd has claimed it.
func (p *Prefiller) commit(_ context.Context, f *fill.Fill, spool string) error {
	target := p.blobPath(f.Key.Digest)
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return err
	}
	file, err := os.Open(spool)
	if err != nil {
		return err
	}
	err = file.Sync()
	file.Close()
	if err != nil {
		return err
	}
	if err := os.Chmod(spool, 0o444); err != nil {
		return err
	}
	p.cfg.Protect(f.Key.Digest, time.Now().Add(p.cfg.ProtectFor))
	if err := os.Rename(spool, target); err != nil {
		return err
	}
	p.log.Debug("prefilled", "digest", f.Key.Digest, "size", f.Size())
	return nil
}

// manifestMediaTypes are the manifests whose config and layers are prefilled. Indexes
// are not: the platform is containerd's choice, and its manifest comes next anyway.
var manifestMediaTypes = map[string]bool{
	ocispec.MediaTypeImageManifest:                         true,
	"application/vnd.docker.distribution.manifest.v2+json": true,
}

// OnManifest is the resolver hook's mirror.Config.OnManifest: it starts the prefill of
// the manifest's blobs and returns the hold that waits for them, bounded by MaxHold.
func (p *Prefiller) OnManifest(_ context.Context, m mirror.Manifest) func(context.Context) {
	var man ocispec.Manifest
	if json.Unmarshal(m.Body, &man) != nil {
		return nil
	}
	mediaType := man.MediaType
	if mediaType == "" {
		mediaType = m.MediaType
	}
	if !manifestMediaTypes[mediaType] {
		return nil
	}
	header := m.Header.Clone()
	owner := m.Registry + "|" + m.Repository + "|" + header.Get("Authorization")
	var pending []*fill.Fill
	for _, desc := range append([]ocispec.Descriptor{man.Config}, man.Layers...) {
		if desc.Digest.Validate() != nil || desc.Size < 0 || p.has(desc.Digest, desc.Size) {
			continue
		}
		d, size := desc.Digest, desc.Size
		f, _ := p.fills.Join(fill.Key{Registry: "local", Digest: d}, owner, func(ctx context.Context, from, to int64) (*http.Response, error) {
			release, err := p.acquire(ctx, d)
			if err != nil {
				return nil, err
			}
			h := header.Clone()
			h.Del("Range")
			for k, v := range fill.RangeHeader(from, to) { // a range: the fill resumes a body cut short
				h[k] = v
			}
			resp, err := p.cfg.Fetch(ctx, m.Registry, m.Repository, d, h)
			if err != nil {
				release()
				return nil, err
			}
			if resp.StatusCode == http.StatusOK && resp.ContentLength >= 0 && resp.ContentLength != size {
				resp.Body.Close()
				release()
				return nil, fmt.Errorf("cove-cache sent %d bytes for a %d-byte blob", resp.ContentLength, size)
			}
			// The slot is the transfer's, not the request's: held until the body is done.
			resp.Body = &releasingBody{ReadCloser: resp.Body, release: release}
			return resp, nil
		})
		pending = append(pending, f)
	}
	if len(pending) == 0 {
		return nil
	}
	p.log.Debug("prefilling", "registry", m.Registry, "repository", m.Repository, "manifest", m.Digest, "blobs", len(pending))
	return func(ctx context.Context) {
		ctx, cancel := context.WithTimeout(ctx, p.cfg.MaxHold)
		defer cancel()
		var wg sync.WaitGroup
		for _, f := range pending {
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer f.Release()
				select {
				case <-f.Settled():
				case <-ctx.Done():
				}
			}()
		}
		wg.Wait()
	}
}

// Joinable is the resolver hook's mirror.Config.Joinable: the running prefill of d for
// this client, acquired, or nil. Only the same (registry, repository, credentials) may
// join: those are what the origin authorized for this prefill.
func (p *Prefiller) Joinable(registry, repository string, d digest.Digest, header http.Header) *fill.Fill {
	f := p.fills.Lookup(fill.Key{Registry: "local", Digest: d})
	if f == nil {
		return nil
	}
	if f.Owner != registry+"|"+repository+"|"+header.Get("Authorization") {
		f.Release()
		return nil
	}
	p.demand(d)
	return f
}

// acquire takes one of the Parallel fetch slots for the prefill of d, waiting while ctx
// lasts and at most MaxHold: by then the manifest's hold is over and containerd fetches
// what it still misses. A prefill containerd itself asks for (demand) goes at once
// without a slot, as containerd's own request would: containerd bounds how many blobs
// it fetches at a time. release gives the slot back.
func (p *Prefiller) acquire(ctx context.Context, d digest.Digest) (release func(), err error) {
	free := func() { <-p.sem }
	select {
	case p.sem <- struct{}{}:
		return free, nil
	default:
	}
	asked := make(chan struct{})
	p.mu.Lock()
	p.queued[d] = asked
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		if p.queued[d] == asked {
			delete(p.queued, d)
		}
		p.mu.Unlock()
	}()
	timer := time.NewTimer(p.cfg.MaxHold)
	defer timer.Stop()
	select {
	case p.sem <- struct{}{}:
		return free, nil
	case <-asked:
		return func() {}, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	case <-timer.C:
		return nil, fmt.Errorf("no prefill slot free within %s", p.cfg.MaxHold)
	}
}

// demand lets the queued prefill of d, if any, start now: containerd waits for it.
func (p *Prefiller) demand(d digest.Digest) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ch := p.queued[d]; ch != nil {
		close(ch)
		delete(p.queued, d)
	}
}

// releasingBody gives the fetch slot back when the fill closes the body: at its end,
// or when the fetch failed.
type releasingBody struct {
	io.ReadCloser
	release func()
	once    sync.Once
}

func (b *releasingBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.release)
	return err
}
