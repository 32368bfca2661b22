package content

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	digest "github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// PrefillDir is the directory, below the store root, where Prefill writes a blob before
// renaming it into blobs/<alg>/<hex>. It must not be below blobs/ (the store's Walk
// reports every file there, and containerd's GC then fails to delete a temp file whose
// name is not a digest) nor below ingest/ (containerd's GC aborts every ingest its
// metadata does not know, plugins/content/local/store.go WalkStatusRefs/ListStatuses).
// Neither containerd's local store nor its GC looks anywhere else under the root.
const PrefillDir = ".cove-prefill"

// Store is containerd's own local content store (plugins/content/local, the same
// on-disk layout as the built-in io.containerd.content.v1.content plugin) with one
// addition: blobs registered with Protect survive Delete until their protection ends.
//
// containerd's GC (core/metadata/content.go, garbageCollect) walks the backend and
// deletes every blob no namespace references. A blob cove-node prefills before
// containerd asks for it is referenced by nothing yet, so without protection the first
// GC after the prefill would delete it.
//
// Info, ReaderAt, Walk and the writers are the local store's own: Info is one stat,
// which matters because containerd calls it inside its metadata write transaction.
type Store struct {
	content.Store
	root string
	log  *slog.Logger
	now  func() time.Time

	mu        sync.Mutex
	protected map[digest.Digest]time.Time

	protectedDeletes atomic.Int64
	deletes          atomic.Int64
}

// NewStore opens (creating if needed) the local content store at root, for example
// /var/lib/containerd/io.containerd.content.v1.content: the built-in plugin's own
// directory, so switching the hook on or off loses nothing.
func NewStore(root string, logger *slog.Logger) (*Store, error) {
	if root == "" {
		return nil, errors.New("content: store root is empty")
	}
	if logger == nil {
		logger = slog.Default()
	}
	ls, err := local.NewStore(root)
	if err != nil {
		return nil, err
	}
	return &Store{
		Store:     ls,
		root:      root,
		log:       logger,
		now:       time.Now,
		protected: map[digest.Digest]time.Time{},
	}, nil
}

// Root is the store's directory.
func (s *Store) Root() string { return s.root }

// Protect makes Delete of dgst a no-op success until the given time; after it, Delete
// really deletes. Protecting again replaces the time (a zero time removes the
// protection). Protections live in memory: a restarted process starts with none.
func (s *Store) Protect(dgst digest.Digest, until time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if until.IsZero() {
		delete(s.protected, dgst)
		return
	}
	s.protected[dgst] = until
}

// Protected reports whether dgst is protected now, and until when.
func (s *Store) Protected(dgst digest.Digest) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	until, ok := s.protected[dgst]
	if !ok || !s.now().Before(until) {
		return time.Time{}, false
	}
	return until, true
}

// Delete deletes the blob unless it is protected, in which case it succeeds without
// deleting anything. An expired protection is forgotten and the blob deleted.
func (s *Store) Delete(ctx context.Context, dgst digest.Digest) error {
	s.mu.Lock()
	until, ok := s.protected[dgst]
	if ok && s.now().Before(until) {
		s.mu.Unlock()
		s.protectedDeletes.Add(1)
		s.log.Debug("content delete skipped: blob is protected", "digest", dgst, "until", until)
		return nil
	}
	if ok {
		delete(s.protected, dgst)
	}
	s.mu.Unlock()
	s.deletes.Add(1)
	return s.Store.Delete(ctx, dgst)
}

// Prefill writes the blob desc describes from r straight into the store, as a file
// under PrefillDir renamed to blobs/<alg>/<hex> once its size and digest are verified,
// and protects it until the given time (before the rename, so no GC can slip in
// between). containerd's next pull of this blob then finds it with Info and does not
// download it. It never touches the store's ingest directory. A blob already present
// is only protected.
func (s *Store) Prefill(ctx context.Context, desc ocispec.Descriptor, r io.Reader, until time.Time) error {
	if err := desc.Digest.Validate(); err != nil {
		return fmt.Errorf("prefill: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	target := filepath.Join(s.root, "blobs", desc.Digest.Algorithm().String(), desc.Digest.Encoded())
	if _, err := s.Store.Info(ctx, desc.Digest); err == nil {
		s.Protect(desc.Digest, until)
		return nil
	}
	tmpDir := filepath.Join(s.root, PrefillDir)
	if err := os.MkdirAll(tmpDir, 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(tmpDir, desc.Digest.Encoded()+".*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	verifier := desc.Digest.Verifier()
	n, err := io.Copy(io.MultiWriter(f, verifier), r)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("prefill %s: %w", desc.Digest, err)
	}
	if desc.Size >= 0 && n != desc.Size {
		return fmt.Errorf("prefill %s: got %d bytes, want %d: %w", desc.Digest, n, desc.Size, errdefs.ErrFailedPrecondition)
	}
	if !verifier.Verified() {
		return fmt.Errorf("prefill %s: content does not match its digest: %w", desc.Digest, errdefs.ErrFailedPrecondition)
	}
	// Same mode as blobs committed by the local store's writer.
	if err := os.Chmod(tmp, 0o444); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return err
	}
	s.Protect(desc.Digest, until)
	if err := os.Rename(tmp, target); err != nil {
		return fmt.Errorf("prefill %s: %w", desc.Digest, err)
	}
	return syncDir(filepath.Dir(target))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
